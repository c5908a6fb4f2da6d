"""Bad adapters are refused with the reason before any weight reaches the model (RELIABILITY 14-16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from adaptgate.adapters.refs import parse_ref
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.model import load_base_model
from adaptgate.errors import AdapterNotFound, BaseModelMismatch, InvalidAdapter, InvalidArgument
from tests.unit.peft_adapters import adapter_files, make_peft_adapter


@pytest.fixture(scope="module")
def base(tiny_bert_dir: Path):
    return load_base_model(tiny_bert_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def good_files(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("good")
    make_peft_adapter(tiny_bert_dir, out, num_labels=3, rank=4, seed=3)
    return adapter_files(out)


@pytest.fixture()
def validator(base) -> AdapterValidator:
    return AdapterValidator(base.spec, max_rank=8, max_labels=16)


def with_config(files: dict[str, bytes], **changes: object) -> dict[str, bytes]:
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    return {**files, "adapter_config.json": json.dumps(config).encode()}


def test_plain_peft_adapter_is_accepted(validator, good_files) -> None:
    weights = validator.parse(good_files)
    assert weights.labels == ["class-0", "class-1", "class-2"]
    assert weights.rank == 4 and weights.scaling == 2.0
    assert "encoder.layer.0.attention.self.query" in weights.lora
    assert weights.head_weight is not None and tuple(weights.head_weight.shape) == (3, 32)


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda f: {**f, "adapter_model.bin": b"\x80\x04"}, InvalidAdapter, "pickle"),
        (lambda f: {**f, "run.sh": b"rm -rf /"}, InvalidAdapter, "unexpected file"),
        (lambda f: {k: v for k, v in f.items() if k != "adapter_config.json"}, InvalidAdapter, "missing"),
        (lambda f: {**f, "adapter_config.json": b"{not json"}, InvalidAdapter, "not valid JSON"),
        (lambda f: {**f, "adapter_model.safetensors": b"garbage" * 10}, InvalidAdapter, "safetensors"),
        (lambda f: with_config(f, r=64), InvalidAdapter, "rank"),
        (lambda f: with_config(f, peft_type="PREFIX_TUNING"), InvalidAdapter, "peft_type"),
        (lambda f: with_config(f, use_dora=True), InvalidAdapter, "DoRA"),
        (lambda f: with_config(f, target_modules=["query"]), InvalidAdapter, "target_modules"),
        (lambda f: {**f, "labels.json": b'["a", "b"]'}, InvalidAdapter, "labels.json"),
        (
            lambda f: {**f, "adaptgate.json": json.dumps({"base_fingerprint": "0123456789abcdef"}).encode()},
            BaseModelMismatch,
            "another base model",
        ),
    ],
)
def test_bad_adapters_are_refused_with_the_reason(validator, good_files, mutate, error, words) -> None:
    with pytest.raises(error, match=words):
        validator.parse(mutate(dict(good_files)))


def test_wrong_shapes_are_another_base_model(validator, good_files) -> None:
    tensors = {
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": torch.zeros(32, 4),
    }
    files = with_config({**good_files, "adapter_model.safetensors": save(tensors)}, target_modules=["query"])
    files.pop("labels.json")
    with pytest.raises(BaseModelMismatch, match="do not fit"):
        validator.parse(files)


def test_unknown_module_is_another_base_model(validator, good_files) -> None:
    tensors = {
        "base_model.model.bert.encoder.layer.9.attention.self.query.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.bert.encoder.layer.9.attention.self.query.lora_B.weight": torch.zeros(32, 4),
    }
    files = with_config({**good_files, "adapter_model.safetensors": save(tensors)}, target_modules=["query"])
    files.pop("labels.json")
    with pytest.raises(BaseModelMismatch, match="does not have"):
        validator.parse(files)


@pytest.mark.parametrize("bad", ["../etc", "/abs", "a/b/c", "UPPER", " ", "x" * 70, "name@", "t/n:"])
def test_references_confined_to_the_store(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_ref(bad, "acme")


def test_reference_forms() -> None:
    assert str(parse_ref("spam", "acme")) == "acme/spam"
    assert parse_ref("acme/spam@v3", "x").version == 3
    assert parse_ref("spam@3", "acme").version == 3
    assert parse_ref("other/spam:prod", "acme").alias == "prod"


def test_store_versions_aliases_and_rollback(tmp_path: Path, validator, good_files) -> None:
    store = AdapterStore(tmp_path, validator)
    v1 = store.publish("acme", "spam", good_files, alias="prod")
    v2 = store.publish("acme", "spam", good_files)
    assert (v1.version, v2.version) == (1, 2)
    assert store.resolve(parse_ref("spam:prod", "acme")).version == 1
    assert store.resolve(parse_ref("spam", "acme")).version == 2  # bare name = latest
    store.set_alias(parse_ref("spam@2", "acme"), "prod")
    assert store.resolve(parse_ref("spam:prod", "acme")).version == 2
    store.set_alias(parse_ref("spam@1", "acme"), "prod")  # rollback is a flip back
    assert store.get(parse_ref("spam:prod", "acme")).aliases == ["prod"]
    with pytest.raises(AdapterNotFound):
        store.resolve(parse_ref("spam@7", "acme"))


def test_failed_publish_leaves_versions_and_aliases_alone(tmp_path: Path, validator, good_files) -> None:
    store = AdapterStore(tmp_path, validator)
    store.publish("acme", "spam", good_files, alias="prod")
    with pytest.raises(InvalidAdapter):
        store.publish("acme", "spam", {**good_files, "adapter_model.safetensors": b"corrupt"}, alias="prod")
    assert [r.version for r in store.list("acme")] == [1]
    assert store.resolve(parse_ref("spam:prod", "acme")).version == 1
    assert not [p for p in (tmp_path / "acme" / "spam").iterdir() if p.name.startswith(".staging")]


def test_symlink_out_of_the_store_is_refused(tmp_path: Path, validator, good_files) -> None:
    store = AdapterStore(tmp_path / "store", validator)
    store.publish("acme", "spam", good_files)
    outside = tmp_path / "secret.json"
    outside.write_text("[]")
    labels = tmp_path / "store" / "acme" / "spam" / "v1" / "labels.json"
    labels.unlink()
    labels.symlink_to(outside)
    with pytest.raises(InvalidArgument, match="link out of the adapter store"):
        store.read_files(parse_ref("spam@1", "acme"))


def test_adapter_from_another_base_model_is_refused(other_tiny_bert_dir: Path, validator, tmp_path: Path) -> None:
    from adaptgate.adapters.format import head_only_files
    from adaptgate.engine.model import load_base_model

    other = load_base_model(other_tiny_bert_dir, dtype="float32", device="cpu")
    files = head_only_files(torch.zeros(2, 32), torch.zeros(2), ["a", "b"], other.spec.fingerprint, "job:x")
    with pytest.raises(BaseModelMismatch):
        validator.parse(files)


def test_a_rerun_job_does_not_publish_a_duplicate_version(tmp_path: Path, validator, good_files) -> None:
    store = AdapterStore(tmp_path, validator)
    first = store.publish("acme", "spam", good_files, source="job:job-1")
    again = store.publish("acme", "spam", good_files, alias="prod", source="job:job-1")
    other = store.publish("acme", "spam", good_files, source="job:job-2")
    assert (first.version, again.version, other.version) == (1, 1, 2)
    assert again.aliases == ["prod"]
