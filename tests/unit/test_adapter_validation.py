"""Bad adapters are refused with the reason before any weight reaches the model (RELIABILITY 14-16)."""

from __future__ import annotations

import json
import multiprocessing
import struct
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


# --- hostile tenants: nothing in an adapter's files can stall the server or escape as INTERNAL ---

QUERY = "encoder.layer.0.attention.self.query"


def answer_within(seconds: float, call):
    """Run `call` in a forked process and return ('ok', result) or ('error', exception).

    A regex that backtracks holds the GIL, so a thread could not time out; a process can be killed,
    and the test fails instead of hanging.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        try:
            sender.send(("ok", call()))
        except BaseException as exc:  # handed to the parent, which judges it
            sender.send(("error", exc))

    process = context.Process(target=child, daemon=True)
    process.start()
    try:
        if not receiver.poll(seconds):
            pytest.fail(f"validation did not answer within {seconds} s")
        return receiver.recv()
    finally:
        process.kill()
        process.join()


def test_backtracking_target_regex_is_answered_at_once(validator, good_files) -> None:
    files = with_config(good_files, target_modules="(.|.|.|.)*X")
    kind, value = answer_within(5.0, lambda: validator.parse(files))
    assert kind == "error" and isinstance(value, InvalidAdapter), value
    assert "target_modules" in value.message
    # PEFT's regex form still works
    assert QUERY in validator.parse(with_config(good_files, target_modules=r".*\.(query|key|value|dense)")).lora


@pytest.mark.parametrize(
    ("targets", "words"),
    [
        (r"(a)\1", "RE2 syntax"),
        (r"(?=query)", "RE2 syntax"),
        ("(", "RE2 syntax"),
        ("a" * 2000, "limit is 1024"),
        (42, "list of module names or a regex"),
        ({"query": 1}, "list of module names or a regex"),
        ([1, 2], "module names"),
        (["query", ""], "module names"),
        (["x" * 300], "module names"),
    ],
)
def test_bad_target_modules_are_invalid(validator, good_files, targets, words) -> None:
    with pytest.raises(InvalidAdapter, match=words):
        validator.parse(with_config(good_files, target_modules=targets))


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"r": True}, "rank"),
        ({"lora_alpha": "16"}, "lora_alpha"),
        ({"lora_alpha": "abc"}, "lora_alpha"),
        ({"lora_alpha": [16]}, "lora_alpha"),
        ({"lora_alpha": {"v": 16}}, "lora_alpha"),
        ({"lora_alpha": True}, "lora_alpha"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"lora_alpha": float("inf")}, "lora_alpha"),
        ({"lora_alpha": float("-inf")}, "lora_alpha"),
        ({"lora_alpha": -8}, "lora_alpha"),
        ({"lora_alpha": 1e30}, "lora_alpha"),
        ({"use_rslora": "false"}, "use_rslora"),
    ],
)
def test_bad_numbers_and_flags_are_invalid(validator, good_files, changes, words) -> None:
    with pytest.raises(InvalidAdapter, match=words):
        validator.parse(with_config(good_files, **changes))


@pytest.mark.parametrize(
    "config",
    [
        b'{"peft_type": "LORA", "r": 1' + b"0" * 5000 + b"}",  # Python refuses ints of over 4300 digits
        b"[" * 100_000 + b"]" * 100_000,  # nesting deeper than the JSON parser's recursion
    ],
)
def test_hostile_config_json_is_invalid(validator, good_files, config: bytes) -> None:
    with pytest.raises(InvalidAdapter):
        validator.parse({**good_files, "adapter_config.json": config})


@pytest.mark.parametrize(
    "meta",
    [{"head_input": []}, {"head_input": {"a": 1}}, {"normalize": "false"}],
)
def test_hostile_adaptgate_json_is_invalid(validator, good_files, meta) -> None:
    with pytest.raises(InvalidAdapter):
        validator.parse({**good_files, "adaptgate.json": json.dumps(meta).encode()})


def head_files(base, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, bytes]:
    from adaptgate.adapters.format import head_only_files

    files = head_only_files(torch.zeros(2, 32), torch.zeros(2), ["a", "b"], base.spec.fingerprint, "test")
    tensors = {"base_model.model.classifier.weight": weight, "base_model.model.classifier.bias": bias}
    return {**files, "adapter_model.safetensors": save(tensors)}


def ones(*shape: int, value: float = 1.0) -> torch.Tensor:
    return torch.full(shape, value)


@pytest.mark.parametrize(
    ("weight", "bias", "words"),
    [
        (ones(2, 32, value=float("nan")), ones(2), "NaN or infinity"),
        (ones(2, 32), ones(2, value=float("inf")), "NaN or infinity"),
        (ones(2, 32, value=1e30), ones(2), "magnitude"),
        (ones(2, 32), ones(2, value=-1e6), "magnitude"),
    ],
)
def test_bad_head_weights_are_invalid(validator, base, weight, bias, words) -> None:
    with pytest.raises(InvalidAdapter, match=words):
        validator.parse(head_files(base, weight, bias))


def test_only_floating_point_weights_are_accepted(validator, base) -> None:
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.bool):
        with pytest.raises(InvalidAdapter, match="floating point"):
            validator.parse(head_files(base, torch.ones(2, 32, dtype=dtype), torch.zeros(2, dtype=dtype)))
    weights = validator.parse(head_files(base, ones(2, 32).half(), ones(2).bfloat16()))
    assert weights.head_weight is not None and weights.head_weight.dtype == torch.float32


def lora_only(base, a: torch.Tensor, b: torch.Tensor) -> dict[str, bytes]:
    """A LoRA-only adapter on one module, its A and B saved as given (any dtype, any values)."""
    from adaptgate.adapters.format import lora_files

    files = lora_files({QUERY: (torch.zeros(4, 32), torch.zeros(32, 4))}, 4, 8, None, None, [], base.spec.fingerprint, "test",
                       base_prefix="bert")
    tensors = {f"base_model.model.bert.{QUERY}.lora_A.weight": a, f"base_model.model.bert.{QUERY}.lora_B.weight": b}
    return {**files, "adapter_model.safetensors": save(tensors)}


@pytest.mark.parametrize(
    ("a", "b", "words"),
    [
        (ones(4, 32, value=1e30), ones(32, 4), "magnitude"),
        (ones(4, 32), ones(32, 4, value=-2e4), "magnitude"),
        (torch.ones(4, 32, dtype=torch.int8), ones(32, 4), "floating point"),
    ],
)
def test_bad_lora_weights_are_invalid(validator, base, a, b, words) -> None:
    with pytest.raises(InvalidAdapter, match=words):
        validator.parse(lora_only(base, a, b))


def refuse_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(data: bytes) -> dict[str, torch.Tensor]:
        raise AssertionError("tensors were loaded before the header was checked")

    monkeypatch.setattr("adaptgate.adapters.validation.load_safetensors", fail)


@pytest.mark.parametrize(
    ("tensors", "error", "words"),
    [
        ({"base_model.model.classifier.weight": torch.zeros(5000, 32)}, InvalidAdapter, "limit is 16"),
        ({"base_model.model.classifier.weight": torch.zeros(2, 64)}, BaseModelMismatch, "needs"),
        ({"base_model.model.classifier.weight": torch.zeros(2, 32, dtype=torch.int32)}, InvalidAdapter, "floating point"),
        ({f"base_model.model.bert.{QUERY}.lora_A.weight": torch.zeros(4, 64)}, BaseModelMismatch, "do not fit"),
        ({f"base_model.model.bert.{QUERY}.lora_B.weight": torch.zeros(32, 64)}, InvalidAdapter, "rank 64 .* limit is 8"),
        ({"base_model.model.bert.encoder.layer.7.output.dense.lora_A.weight": torch.zeros(4, 32)}, BaseModelMismatch,
         "does not have"),
        ({"base_model.model.bert.embeddings.word_embeddings.weight": torch.zeros(30522, 32)}, InvalidAdapter,
         "unexpected tensor"),
        ({"base_model.model.classifier.weight": torch.zeros(2, 32), "classifier.weight": torch.zeros(2, 32)},
         InvalidAdapter, "name the same weight"),
    ],
)
def test_header_is_judged_before_any_tensor_is_loaded(
    validator, good_files, monkeypatch, tmp_path: Path, tensors, error, words
) -> None:
    data = save(tensors)
    refuse_loading(monkeypatch)
    with pytest.raises(error, match=words):
        validator.parse({**good_files, "adapter_model.safetensors": data})
    (tmp_path / "w.safetensors").write_bytes(data)
    with pytest.raises(error, match=words):
        validator.check_weights_header(tmp_path / "w.safetensors")


def test_check_weights_header_accepts_a_good_file_reading_only_the_header(validator, good_files, tmp_path: Path) -> None:
    from adaptgate.adapters.safetensors_header import read_safetensors_header

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(good_files["adapter_model.safetensors"])
    validator.check_weights_header(path)
    infos = read_safetensors_header(path)
    assert infos[f"base_model.model.bert.{QUERY}.lora_A.weight"].shape == (4, 32)
    assert infos["base_model.model.classifier.weight"].dtype == "F32"


def header_file(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "shorter than"),
        (b"\x01\x00", "shorter than"),
        (struct.pack("<Q", 1 << 62), "limit is"),
        (header_file({}, length=1000), "only"),
        (header_file(b"{not json"), "not valid JSON"),
        (header_file(b"[1, 2]"), "JSON object"),
        (header_file(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"\0" * 4), "listed twice"),
        (header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}), "outside"),
        (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "needs 8 bytes"),
        (header_file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 8), "shape"),
        (header_file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 8), "shape"),
        (header_file({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8), "unknown dtype"),
        (header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 8), "outside"),
        (header_file({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 8), "exactly"),
        (header_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlap"),
        (header_file({"__metadata__": {"k": 1}}), "__metadata__"),
    ],
)
def test_malformed_headers_are_invalid(tmp_path: Path, data: bytes, words: str) -> None:
    from adaptgate.adapters.safetensors_header import read_safetensors_header

    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    with pytest.raises(InvalidAdapter, match=words):
        read_safetensors_header(path)


@pytest.mark.parametrize("bad", ["acme\n", "spam\n"])
def test_a_trailing_newline_is_not_a_name(bad: str) -> None:
    from adaptgate.adapters.refs import check_name
    from adaptgate.training.data.datasets import check_tenant

    with pytest.raises(InvalidArgument):
        check_name(bad, "tenant")
    with pytest.raises(InvalidArgument):
        check_tenant(bad)
    with pytest.raises(InvalidArgument):
        parse_ref(f"{bad}/spam", "acme")
    with pytest.raises(InvalidArgument):
        parse_ref("spam", bad)
    with pytest.raises(InvalidArgument):
        parse_ref(f"spam:{bad}x", "acme")


def test_a_version_too_long_to_be_a_number_is_not_a_reference() -> None:
    with pytest.raises(InvalidArgument):
        parse_ref("spam@" + "9" * 5000, "acme")


@pytest.mark.parametrize(
    ("abstain", "words"),
    [({"threshold": 1.5, "label": "x"}, "from 0 to 1"), ({"threshold": "0.5", "label": "x"}, "from 0 to 1"),
     ({"threshold": float("nan"), "label": "x"}, "from 0 to 1"), ({"threshold": 0.5, "label": ""}, "label of 1 to"),
     ({"threshold": 0.5, "label": "x" * 129}, "label of 1 to"), ([0.5], "must be an object")],
)
def test_a_bad_abstain_setting_is_invalid(validator: AdapterValidator, abstain: object, words: str) -> None:
    from adaptgate.adapters.format import head_only_files

    files = head_only_files(torch.randn(2, 32), torch.zeros(2), ["a", "b"], "", "test")
    meta = json.loads(files["adaptgate.json"]) | {"abstain": abstain}
    files["adaptgate.json"] = json.dumps(meta).encode()
    with pytest.raises(InvalidAdapter, match=words):
        validator.parse(files)


def test_a_calibrated_abstain_setting_travels_with_the_adapter(validator: AdapterValidator) -> None:
    from adaptgate.adapters.format import head_only_files

    files = head_only_files(torch.randn(2, 32), torch.zeros(2), ["a", "b"], "", "test", abstain=(0.62, "none"))
    weights = validator.parse(files)
    assert (weights.abstain_threshold, weights.abstain_label) == (0.62, "none")
    assert validator.parse(head_only_files(torch.randn(2, 32), torch.zeros(2), ["a", "b"], "", "t")).abstain_threshold is None
