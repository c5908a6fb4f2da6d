"""Properties of everything that reads a tenant's upload: the adapter validator, the dataset parser
and the reference parser. Whatever the input, each answers with its own error class (a clear
INVALID_ARGUMENT / FAILED_PRECONDITION), never another exception (which would be INTERNAL), and
each accepts every well-formed input it is given.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from adaptgate.adapters.format import head_only_files, lora_files
from adaptgate.adapters.refs import parse_ref
from adaptgate.adapters.safetensors_header import DTYPE_BYTES
from adaptgate.adapters.validation import MAX_LORA_ALPHA, MAX_WEIGHT_ABS, AdapterValidator
from adaptgate.engine.model import load_base_model
from adaptgate.errors import BaseModelMismatch, InvalidAdapter, InvalidArgument, InvalidDataset
from adaptgate.training.data.checks import parse_dataset, parse_dataset_file
from tests.unit.peft_adapters import adapter_files, make_peft_adapter

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ADAPTER_ERRORS = (InvalidAdapter, BaseModelMismatch)
MAX_RANK, MAX_LABELS = 8, 16

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def validator(tiny_bert_dir: Path) -> AdapterValidator:
    spec = load_base_model(tiny_bert_dir, dtype="float32", device="cpu").spec
    return AdapterValidator(spec, max_rank=MAX_RANK, max_labels=MAX_LABELS)


@pytest.fixture(scope="module")
def good_files(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("peft")
    make_peft_adapter(tiny_bert_dir, out, num_labels=3, rank=4, seed=3)
    return adapter_files(out)


def parse_or_refuse(validator: AdapterValidator, files: dict[str, bytes]) -> None:
    try:
        validator.parse(files)
    except ADAPTER_ERRORS:
        pass


# --- the adapter validator -----------------------------------------------------------------------

config_changes = st.dictionaries(
    st.sampled_from(["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "bias", "lora_bias"]),
    st.sampled_from(["LORA", "none", 4, 0, 1e30, float("nan"), ".*", r".*\.query", "(", ["query"], [1]]) | json_values,
    max_size=3,
)


@FAST
@given(changes=config_changes, drop=st.booleans())
@example(changes={"lora_alpha": "abc"}, drop=False)
@example(changes={"target_modules": 42}, drop=False)
def test_any_adapter_config_is_accepted_or_refused_cleanly(validator, good_files, changes, drop) -> None:
    """PEFT's own config with a few fields replaced by anything JSON can hold (or removed)."""
    config = json.loads(good_files["adapter_config.json"])
    config = {k: v for k, v in config.items() if k not in changes} if drop else {**config, **changes}
    parse_or_refuse(validator, {**good_files, "adapter_config.json": json.dumps(config).encode()})


@FAST
@given(meta=st.fixed_dictionaries({}, optional={"head_input": st.sampled_from(["pooler", "mean", "x"]) | json_values,
                                                "normalize": json_values, "base_fingerprint": json_values}) | json_values,
       labels=json_values)
def test_any_metadata_and_labels_are_accepted_or_refused_cleanly(validator, good_files, meta, labels) -> None:
    files = {**good_files, "adaptgate.json": json.dumps(meta).encode(), "labels.json": json.dumps(labels).encode()}
    parse_or_refuse(validator, files)


@FAST
@given(config=st.binary(max_size=200), weights=st.binary(max_size=300))
@example(config=b'{"peft_type": "LORA", "r": 1' + b"0" * 5000 + b"}", weights=b"")
@example(config=b"[" * 50_000, weights=b"")
def test_any_bytes_are_accepted_or_refused_cleanly(validator, good_files, config, weights) -> None:
    parse_or_refuse(validator, {**good_files, "adapter_config.json": config})
    parse_or_refuse(validator, {**good_files, "adapter_model.safetensors": weights})


QUERY = "encoder.layer.0.attention.self.query"
tensor_names = st.sampled_from([
    f"base_model.model.bert.{QUERY}.lora_A.weight", f"base_model.model.bert.{QUERY}.lora_B.weight",
    f"{QUERY}.lora_A.weight", "base_model.model.bert.encoder.layer.9.output.dense.lora_B.weight",
    "base_model.model.classifier.weight", "base_model.model.classifier.bias", "score.weight", "classifier.bias",
    "__metadata__",
]) | st.text(max_size=30)
header_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(sorted(DTYPE_BYTES)) | json_values,
        "shape": st.lists(st.integers(-1, 40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-1, 6000), min_size=2, max_size=2) | json_values,
    }
) | json_values


@FAST
@given(header=st.dictionaries(tensor_names, header_entries, max_size=4), data_size=st.integers(0, 6000),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 1 << 40]))
def test_any_safetensors_header_is_accepted_or_refused_cleanly(
    validator, good_files, tmp_path_factory, header, data_size, length_delta
) -> None:
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + bytes(data_size)
    parse_or_refuse(validator, {**good_files, "adapter_model.safetensors": data})
    path = tmp_path_factory.mktemp("header") / "adapter_model.safetensors"
    path.write_bytes(data)
    try:
        validator.check_weights_header(path)
    except ADAPTER_ERRORS:
        pass


special = st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e30, -2e4, 0.5])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool])


@FAST
@given(where=st.sampled_from(["lora_A", "lora_B", "weight", "bias"]), value=special, index=st.integers(0, 63), dtype=dtypes,
       alpha=st.floats(allow_nan=True) | st.integers())
def test_accepted_adapters_hold_only_finite_bounded_numbers(validator, where, value, index, dtype, alpha) -> None:
    """Whatever numbers a file holds, what the validator accepts cannot turn a tenant's logits into NaN or inf."""
    spec, module = validator.spec, "encoder.layer.0.attention.self.query"
    tensors = {"lora_A": torch.zeros(2, 32), "lora_B": torch.zeros(32, 2), "weight": torch.zeros(3, 32), "bias": torch.zeros(3)}
    tensors[where].view(-1)[index % tensors[where].numel()] = value
    tensors[where] = tensors[where].to(dtype)
    files = lora_files({module: (tensors["lora_A"], tensors["lora_B"])}, 2, 4, tensors["weight"], tensors["bias"],
                       ["a", "b", "c"], spec.fingerprint, "test", base_prefix=spec.base_prefix)
    files["adapter_model.safetensors"] = save({
        f"base_model.model.{spec.base_prefix}.{module}.lora_A.weight": tensors["lora_A"],
        f"base_model.model.{spec.base_prefix}.{module}.lora_B.weight": tensors["lora_B"],
        "base_model.model.classifier.weight": tensors["weight"], "base_model.model.classifier.bias": tensors["bias"],
    })
    config = {**json.loads(files["adapter_config.json"]), "lora_alpha": alpha}
    files["adapter_config.json"] = json.dumps(config).encode()
    try:
        weights = validator.parse(files)
    except ADAPTER_ERRORS:
        return
    assert math.isfinite(weights.scaling) and 0 <= weights.scaling <= MAX_LORA_ALPHA
    for tensor in (*weights.lora[module], weights.head_weight, weights.head_bias):
        assert tensor is not None and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all() and tensor.abs().max() <= MAX_WEIGHT_ABS


MODULES = [f"encoder.layer.{i}.{m}" for i in (0, 1) for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]
label_names = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=MAX_LABELS, unique=True)


@FAST
@given(modules=st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True), rank=st.integers(1, MAX_RANK),
       alpha=st.floats(0, 64) | st.integers(0, 64), labels=label_names | st.none(), seed=st.integers(0, 2**31),
       scale=st.sampled_from([1e-3, 0.1, 1.0, 100.0]))
def test_every_well_formed_lora_adapter_is_accepted(validator, modules, rank, alpha, labels, seed, scale) -> None:
    spec = validator.spec
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=generator) * 2 - 1) * scale

    lora = {m: (draw(rank, spec.linear_shapes[m][0]), draw(spec.linear_shapes[m][1], rank)) for m in modules}
    head = (draw(len(labels), spec.hidden_size), draw(len(labels))) if labels else (None, None)
    files = lora_files(lora, rank, alpha, *head, labels or [], spec.fingerprint, "test", base_prefix=spec.base_prefix)
    weights = validator.parse(files)
    assert sorted(weights.lora) == sorted(modules) and weights.rank == rank
    assert weights.scaling == pytest.approx(float(alpha) / rank)
    assert weights.labels == (labels or [])
    for module, (a, b) in lora.items():
        assert torch.equal(weights.lora[module][0], a) and torch.equal(weights.lora[module][1], b)


@FAST
@given(labels=label_names, seed=st.integers(0, 2**31), head_input=st.sampled_from(["mean", "cls", "pooler"]),
       normalize=st.booleans())
def test_every_well_formed_head_adapter_is_accepted(validator, labels, seed, head_input, normalize) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(labels), validator.spec.hidden_size, generator=generator)
    bias = torch.randn(len(labels), generator=generator)
    files = head_only_files(weight, bias, labels, validator.spec.fingerprint, "test", head_input, normalize)
    weights = validator.parse(files)
    assert weights.labels == labels and weights.head_input == head_input and weights.normalize_head_input == normalize
    assert weights.head_weight is not None and torch.equal(weights.head_weight, weight)


# --- the dataset parser --------------------------------------------------------------------------

FORMATS = ("jsonl", "csv")


@FAST
@given(data=st.binary(max_size=400), fmt=st.sampled_from(FORMATS))
@example(data=b'{"text": "a", "label": 1' + b"0" * 5000 + b"}\n", fmt="jsonl")
@example(data=b"[" * 50_000 + b"\n", fmt="jsonl")
@example(data=b"\xef\xbb\xbf\r\r\n\r", fmt="csv")
@example(data=b'text,label\n"a\rb",x\n"\x00",y\n', fmt="csv")
def test_any_bytes_give_a_dataset_or_invalid_dataset(data: bytes, fmt: str) -> None:
    try:
        parse_dataset(data, fmt, max_labels=4)
    except InvalidDataset:
        pass


csv_like = st.text(alphabet=st.sampled_from('ab ,"\r\n\t\x00é\u2028'), max_size=80)
jsonl_like = st.lists(
    st.fixed_dictionaries({}, optional={"text": json_values, "label": json_values}).map(json.dumps)
    | st.text(alphabet=st.sampled_from('{}[]":, ab1\r\\'), max_size=20),
    max_size=8,
).map("\n".join)


@FAST
@given(text=csv_like, header=st.sampled_from(["text,label\n", "label,text,extra\r\n", "\ufefftext,label\r", ""]))
def test_csv_like_text_gives_a_dataset_or_invalid_dataset(text: str, header: str) -> None:
    try:
        parse_dataset((header + text).encode(), "csv")
    except InvalidDataset:
        pass


@FAST
@given(text=jsonl_like)
def test_jsonl_like_text_gives_a_dataset_or_invalid_dataset(text: str) -> None:
    try:
        parse_dataset(text.encode(), "jsonl")
    except InvalidDataset:
        pass


texts = st.text(min_size=1, max_size=30).filter(lambda t: t.strip() != "")
labels = st.text(min_size=1, max_size=8).map(str.strip).filter(bool)


@st.composite
def datasets(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Rows any classifier could train on: 2-4 classes of 2-4 rows each, every text distinct."""
    classes = draw(st.lists(labels, min_size=2, max_size=4, unique=True))
    counts = [draw(st.integers(2, 4)) for _ in classes]
    unique_texts = draw(st.lists(texts, min_size=sum(counts), max_size=sum(counts), unique=True))
    rows = list(zip(unique_texts, [c for c, n in zip(classes, counts) for _ in range(n)]))
    return draw(st.permutations(rows))


def as_jsonl(rows: list[tuple[str, str]], ascii_only: bool) -> bytes:
    return "".join(json.dumps({"text": t, "label": l}, ensure_ascii=ascii_only) + "\n" for t, l in rows).encode()


def csv_lines_of(rows: list[tuple[str, str]], terminator: str) -> tuple[bytes, list[int]]:
    """The CSV file and the physical line each row ends on (CR, LF and CRLF each end a line).

    The csv module quotes a field only for the characters of its own line terminator, so a field
    holding a bare CR next to LF line ends would be written unquoted: everything is quoted then."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=terminator, quoting=csv.QUOTE_MINIMAL if terminator == "\r\n" else csv.QUOTE_ALL)
    writer.writerow(["text", "label"])
    ends = []
    for row in rows:
        writer.writerow(row)
        ends.append(len(re.findall(r"\r\n|\r|\n", out.getvalue())))
    return out.getvalue().encode(), ends


@FAST
@given(rows=datasets(), ascii_only=st.booleans())
def test_jsonl_rows_round_trip(rows: list[tuple[str, str]], ascii_only: bool) -> None:
    parsed = parse_dataset(as_jsonl(rows, ascii_only), "jsonl")
    assert list(zip(parsed.texts, parsed.labels)) == rows
    assert parsed.lines == list(range(1, len(rows) + 1))


@FAST
@given(rows=datasets(), terminator=st.sampled_from(["\n", "\r\n", "\r"]))
def test_csv_rows_round_trip(rows: list[tuple[str, str]], terminator: str) -> None:
    data, ends = csv_lines_of(rows, terminator)
    parsed = parse_dataset(data, "csv")
    assert list(zip(parsed.texts, parsed.labels)) == rows
    assert parsed.lines == ends


@FAST
@given(rows=datasets(), where=st.integers(0, 20), fmt=st.sampled_from(FORMATS))
def test_a_bad_row_is_named_by_its_line(rows: list[tuple[str, str]], where: int, fmt: str) -> None:
    """A row with an empty text, anywhere in the file, is reported on the line it ends on."""
    where = where % (len(rows) + 1)
    rows = rows[:where] + [(" ", "x")] + rows[where:]
    if fmt == "jsonl":
        data, line = as_jsonl(rows, ascii_only=False), where + 1
    else:
        data, ends = csv_lines_of(rows, "\r\n")
        line = ends[where]
    with pytest.raises(InvalidDataset, match=rf"empty or whitespace-only text on line {line}\b"):
        parse_dataset(data, fmt)


@FAST
@given(rows=datasets(), fmt=st.sampled_from(FORMATS))
def test_a_file_parses_like_its_bytes(tmp_path_factory, rows: list[tuple[str, str]], fmt: str) -> None:
    data = as_jsonl(rows, ascii_only=False) if fmt == "jsonl" else csv_lines_of(rows, "\n")[0]
    path = tmp_path_factory.mktemp("upload") / f"data.{fmt}"
    path.write_bytes(data)
    from_file, from_bytes = parse_dataset_file(path, fmt, "text", "label", None), parse_dataset(data, fmt)
    assert (from_file.texts, from_file.labels, from_file.lines) == (from_bytes.texts, from_bytes.labels, from_bytes.lines)


# --- the reference parser ------------------------------------------------------------------------

near_refs = st.text(alphabet=st.sampled_from("ab09_.-/@:v \n\t\u0663Ａ"), max_size=24)


@FAST
@given(text=near_refs | st.text(max_size=40), tenant=st.sampled_from(["acme", "a..b", "Acme", "acme\n", ""]) | near_refs)
@example(text="a..b", tenant="acme")
@example(text="spam", tenant="acme\n")
@example(text="spam@\u0663", tenant="acme")
def test_references_parse_to_safe_names_or_invalid_argument(text: str, tenant: str) -> None:
    try:
        ref = parse_ref(text, tenant)
    except InvalidArgument:
        return
    for name in (ref.tenant, ref.name, ref.alias or "x"):
        assert "/" not in name and ".." not in name and "\n" not in name and name == name.strip()
    assert parse_ref(str(ref), "someone-else") == ref
    assert ref.version is None or 0 <= ref.version < 10**9
