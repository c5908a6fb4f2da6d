"""The fused CPU kernels give the PyTorch paths' answers, check their arguments before any kernel runs,
load from the installed package without a compiler, and the engine falls back when they cannot load.

The bf16 comparisons need a CPU with AVX512-BF16, the fp32 LoRA kernel's AVX2 with FMA (skipped elsewhere);
loading, argument checks and the choice of path run on any x86-64 machine where the package was installed
with a C compiler."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.lora import LoraLayers
from adaptgate.engine import cpu_features, cpu_kernels
from adaptgate.engine.cpu_kernels import CpuKernels, load_extension, operation_paths
from adaptgate.engine.model import load_base_model
from adaptgate.engine.packed import Packing, PackedBertEncoder, row_spans
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from tests.unit.peft_adapters import adapter_files, make_peft_adapter


REPO = Path(__file__).resolve().parents[2]
CAN_RUN = not cpu_features.missing_kernel_isa()  # the bf16 kernels
CAN_RUN_FP32 = not cpu_features.missing_kernel_isa(isa=cpu_features.FP32_KERNELS)


def _compiler_at_install() -> bool:
    """Whether `pip install` could have built the extension here (the tests then insist that it did)."""
    return (shutil.which("cc") or shutil.which("gcc")) is not None and sysconfig.get_platform().endswith("x86_64")


@pytest.fixture(scope="module")
def kernel() -> CpuKernels:
    """Skipped only where it cannot run; a kernel that fails to load on a capable machine fails the tests."""
    if not CAN_RUN:
        pytest.skip(f"this CPU lacks {', '.join(cpu_features.missing_kernel_isa())}")
    return CpuKernels.load()


@pytest.fixture(scope="module")
def ops() -> object:
    """torch.ops.adaptgate, registered from the installed extension (its checks run on any CPU)."""
    if not _compiler_at_install():
        pytest.skip("no C compiler here, so the install could not build the extension")
    return cpu_kernels.ops()


def _layers(fan_in: int, fan_out: int, rank: int, kernel: CpuKernels | None, adapters: list[tuple[torch.Tensor, torch.Tensor]]) -> LoraLayers:
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(fan_in, fan_out)}).to(torch.bfloat16)
    layers = LoraLayers(model, n_slots=len(adapters), max_rank=rank, kernel=kernel)
    for slot, (a, b) in enumerate(adapters):
        layers.install(slot, {"proj": (a, b)}, scaling=2.0)
    return layers


def _adapters(fan_in: int, fan_out: int, ranks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(r, fan_in, generator=gen) * 0.3, torch.randn(fan_out, r, generator=gen) * 0.3) for r in ranks]


def _exact(x: torch.Tensor, layers: LoraLayers, adapters, row_of: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """fp32 reference: the bf16 base output plus each token's delta, computed exactly."""
    with torch.no_grad():
        y = layers.model["proj"].base(x).float()
    for i, row in enumerate(row_of.tolist()):
        slot = row_slots[row]
        if slot >= 0:
            a, b = adapters[slot]
            y[i] += 2.0 * (x[i].float() @ a.bfloat16().float().t()) @ b.float().t()
    return y


@pytest.mark.parametrize(("fan_in", "fan_out"), [(384, 1536), (40, 24), (1536, 384)])
@pytest.mark.parametrize("row_slots", [[0, -1, 1, 2, -1], [2, 0, 1, 1, 0]])
def test_kernel_matches_the_bmm_path_padded(kernel: CpuKernels, fan_in: int, fan_out: int, row_slots: list[int]) -> None:
    adapters = _adapters(fan_in, fan_out, [8, 3, 12])  # r_max 12: the kernel pads slots to 16, ranks 3 and 8 to that
    x = torch.randn(len(row_slots), 7, fan_in).bfloat16()
    outputs = []
    for k in (kernel, None):
        layers = _layers(fan_in, fan_out, 12, k, adapters)
        assert (layers.path == "fused CPU kernel") == (k is not None)
        layers.prepare(row_slots, torch.device("cpu"))
        with torch.inference_mode():
            outputs.append(layers.model["proj"](x).float())
    exact = _exact(x.view(-1, fan_in), layers, adapters, torch.arange(len(row_slots)).repeat_interleave(7), row_slots)
    fused, bmm = (o.view(-1, fan_out) for o in outputs)
    scale = exact.abs().max()
    assert (fused - exact).abs().max() <= (bmm - exact).abs().max() + 1e-2 * scale  # one rounding, not three
    torch.testing.assert_close(fused, bmm, atol=3e-2 * float(scale), rtol=0)
    assert (fused - layers.model["proj"].base(x).float().view(-1, fan_out)).abs().max() > 1e-2 * scale  # LoRA did act


def test_kernel_matches_the_bmm_path_on_packed_tokens(kernel: CpuKernels) -> None:
    lengths, row_slots = [3, 9, 1, 6], [1, -1, 0, 1]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    adapters = _adapters(64, 96, [4, 8])
    packed = torch.randn(Packing.from_mask(mask).gather.numel(), 64).bfloat16()  # real tokens and the bucket's filler
    outputs = []
    for k in (kernel, None):
        layers = _layers(64, 96, 8, k, adapters)
        layers.prepare(row_slots, torch.device("cpu"), Packing.from_mask(mask))
        with torch.inference_mode():
            outputs.append(layers.model["proj"](packed.clone()).float()[: sum(lengths)])
    row_of = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    exact = _exact(packed[: sum(lengths)], layers, adapters, row_of, row_slots)
    torch.testing.assert_close(outputs[0], outputs[1], atol=3e-2 * float(exact.abs().max()), rtol=0)
    no_lora = row_of == 1
    torch.testing.assert_close(outputs[0][no_lora], exact[no_lora], atol=0, rtol=0)  # a row without an adapter is untouched


def test_kernel_runs_on_the_callers_torch_threads(ops: object) -> None:
    """One OpenMP runtime (torch's libgomp, found by soname): the kernels add no thread team of their own
    (engine.thread). Read through the extension, which runs this on any CPU."""
    ext = load_extension()
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert ext.threads() == torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)
    # In a fresh process: other test modules load libraries (scikit-learn) that bring their own libgomp.
    maps = subprocess.run([sys.executable, "-c", ONLY_TORCH_AND_THE_KERNELS], capture_output=True, text=True, timeout=60)
    assert maps.returncode == 0, maps.stderr
    gomp = set(maps.stdout.split())
    assert len(gomp) == 1 and Path(torch.__file__).parent in Path(gomp.pop()).parents, "only torch's libgomp is mapped"


ONLY_TORCH_AND_THE_KERNELS = """
from pathlib import Path
import torch
from adaptgate.engine import cpu_kernels
cpu_kernels.load_extension()
print(*{line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "libgomp" in line})
"""


LOAD_IN_A_BARE_ENVIRONMENT = """
import json, logging, torch
from adaptgate.engine import cpu_features, cpu_kernels
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
ext = cpu_kernels.load_extension()
kernels = cpu_kernels.CpuKernels.try_load()
cpu_kernels.ops(ext)
print(json.dumps({
    "file": ext.__file__, "missing": list(cpu_features.missing_kernel_isa()), "loaded": kernels is not None,
    "max_rank": ext.MAX_RANK, "ops": [name for name in cpu_kernels.SCHEMAS if hasattr(torch.ops.adaptgate, name)],
}))
"""


def test_the_installed_kernels_load_without_a_compiler(tmp_path: Path) -> None:
    """Nothing is compiled at start: with no compiler reachable (PATH empty, CC a missing file) the built
    extension imports from the package (every symbol resolved: Python loads it with RTLD_NOW), its ops
    register, and the detector alone decides whether they run."""
    if not _compiler_at_install():
        pytest.skip("no C compiler here, so the install could not build the extension")
    env = {"PATH": str(tmp_path), "CC": str(tmp_path / "no-such-cc"), "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", LOAD_IN_A_BARE_ENVIRONMENT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    package = Path(cpu_kernels.__file__).parent
    assert Path(found["file"]).parent == package and found["file"].endswith(sysconfig.get_config_var("EXT_SUFFIX"))
    assert found["ops"] == list(cpu_kernels.SCHEMAS) and found["max_rank"] == 64
    assert found["missing"] == list(cpu_features.missing_kernel_isa())
    assert found["loaded"] == (CAN_RUN or CAN_RUN_FP32)
    if not CAN_RUN and CAN_RUN_FP32:
        assert "INFO fp32 LoRA on CPU runs the fused AVX2 kernel; packed attention and add+LayerNorm run as PyTorch ops: this CPU lacks" in out.stderr
    elif not CAN_RUN:
        assert "INFO LoRA, packed attention and add+LayerNorm on CPU run as PyTorch ops: this CPU lacks" in out.stderr


def test_engine_warns_and_keeps_the_pytorch_paths_when_the_extension_does_not_load(caplog: pytest.LogCaptureFixture) -> None:
    """A CPU that could run the kernels but a package without them (built where no compiler was): a WARNING
    with the reason, not a quiet slow path. A CPU without the instruction set is an INFO."""
    with caplog.at_level(logging.INFO, logger="adaptgate.engine.cpu_kernels"):
        assert CpuKernels.try_load(frozenset(cpu_features.KERNEL_ISA[cpu_features.BF16_KERNELS]), extension="adaptgate.engine._no_such_kernels") is None
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "_no_such_kernels did not load" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adaptgate.engine.cpu_kernels"):
        assert CpuKernels.try_load(frozenset({"avx2", "avx512f"})) is None
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "lacks avx512bw, avx512vl, avx512_bf16 and fma" in record.getMessage()


def test_setup_builds_for_the_instruction_sets_the_detector_checks() -> None:
    """setup.py's -m flags for each instruction set and cpu_features.KERNEL_ISA name the same extensions
    (cpuinfo spells bf16 avx512_bf16), and every kernel source is compiled for one of those sets."""
    text = (REPO / "setup.py").read_text()
    for isa, extensions in cpu_features.KERNEL_ISA.items():
        (flags,) = re.findall(rf'"{isa}": \[([^\]]*)\]', text)
        assert {f.replace("avx512bf16", "avx512_bf16") for f in re.findall(r'"-m(\w+)"', flags)} == set(extensions)
    glue = set(re.findall(r'KERNELS / "(\w+\.c)"\)(?=[,\]])', text))  # GLUE_SOURCES: no ISA flags
    kernel_sources = {p.name for p in (REPO / "services/adaptgate/engine/kernels").glob("*.c")} - glue
    assert "module.c" in glue
    sources = dict(re.findall(r'KERNELS / "(\w+\.c)"\): "(\w+)"', text))
    assert set(sources) == kernel_sources and set(sources.values()) == set(cpu_features.KERNEL_ISA)
    assert "-march=native" not in text


def test_each_operation_reports_the_path_the_detector_allows(tiny_bert_dir: Path) -> None:
    """On a CPU without AVX512-BF16 every bf16 kernel operation says "pytorch", and an fp32 model's LoRA runs the
    AVX2 kernel where the CPU has it; the metric carries the same."""
    from prometheus_client import generate_latest

    from adaptgate.engine.prepacked import can_prepack
    from adaptgate.metrics import Metrics

    base = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu")
    forward = BatchForward(base, n_slots=2, max_rank=8, max_labels=4)
    expected = operation_paths(lora="avx512_bf16" if CAN_RUN else "pytorch", attention=CAN_RUN, linears=can_prepack())
    assert forward.kernel_paths == expected
    assert all(forward.kernel_paths[name] == ("avx512_bf16" if CAN_RUN else "pytorch") for name in ("lora_delta", "packed_attention", "add_layer_norm"))
    off = BatchForward(load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu"), 2, 8, 4, cpu_kernels=False)
    assert off.kernel_paths == operation_paths(lora="pytorch", attention=False, linears=can_prepack())  # the kernels' switch only
    fp32 = BatchForward(load_base_model(tiny_bert_dir, dtype="float32", device="cpu"), 2, 8, 4)
    assert fp32.kernel_paths == operation_paths(lora="avx2_fma" if CAN_RUN_FP32 else "pytorch", attention=False, linears=False)
    assert (fp32.lora.path == "fused CPU kernel") == CAN_RUN_FP32
    metrics = Metrics()
    metrics.engine_kernels(forward.kernel_paths)
    text = generate_latest(metrics.registry).decode()
    for operation, path in expected.items():
        assert f'adaptgate_engine_kernel_info{{operation="{operation}",path="{path}"}} 1.0' in text


def _lora_args(**change: torch.Tensor) -> list[torch.Tensor]:
    """Valid lora_delta arguments (10 tokens, 16 -> 24 features, 3 slots of rank 8) with some replaced."""
    args = {
        "x": torch.zeros(10, 16, dtype=torch.bfloat16), "y": torch.zeros(10, 24, dtype=torch.bfloat16),
        "a": torch.zeros(3, 8, 16, dtype=torch.bfloat16), "bv": torch.zeros(3, 4, 24, 2, dtype=torch.bfloat16),
        "tokens": torch.arange(10), "slots": torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2]),
    }  # fmt: skip
    args.update(change)
    return list(args.values())


FP32_ARGS = {"x": torch.zeros(10, 16), "y": torch.zeros(10, 24), "a": torch.zeros(3, 8, 16), "bv": torch.zeros(3, 4, 24, 2)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"x": torch.zeros(10, 16, dtype=torch.float16)}, "x must be a contiguous 2-D torch.bfloat16"),
        ({"x": torch.zeros(10, 16)}, "y must be a contiguous 2-D torch.float32"),  # x's dtype picks the kernel
        (FP32_ARGS, "bv must be a contiguous 3-D torch.float32"),  # fp32 B is not rank-pair interleaved
        ({**FP32_ARGS, "bv": torch.zeros(3, 4, 24)}, r"b \[slots, rank, 24\], got \(3, 8, 16\) and \(3, 4, 24\)"),
        ({"y": torch.zeros(24, 10, dtype=torch.bfloat16).t()}, "y must be a contiguous"),
        ({"y": torch.zeros(9, 24, dtype=torch.bfloat16)}, "one row per token"),
        ({"a": torch.zeros(3, 8, 12, dtype=torch.bfloat16)}, "a must be"),
        ({"bv": torch.zeros(3, 8, 24, 2, dtype=torch.bfloat16)}, "bv"),
        ({"tokens": torch.arange(10, dtype=torch.int32)}, "tokens must be a contiguous 1-D torch.int64"),
        ({"slots": torch.zeros(9, dtype=torch.int64)}, "one length"),
        ({"tokens": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 10])}, r"tokens\[9\] = 10 is outside x's 10 rows"),
        ({"tokens": torch.tensor([0, -1, 2, 3, 4, 5, 6, 7, 8, 9])}, r"tokens\[1\] = -1"),
        ({"slots": torch.tensor([0, 0, 1, 1, 1, 2, 3, 0, 1, 2])}, r"slots\[6\] = 3 is outside the 3 slots"),
        ({"a": torch.zeros(3, 4, 16, dtype=torch.bfloat16), "bv": torch.zeros(3, 2, 24, 2, dtype=torch.bfloat16)}, "multiple of 8"),
    ],
)
def test_lora_delta_refuses_wrong_arguments_before_any_kernel_runs(ops: object, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.lora_delta(*_lora_args(**change))


def test_valid_arguments_reach_the_kernel_only_on_a_capable_cpu(ops: object) -> None:
    """Every check passed: on a CPU without AVX512-BF16 the extension refuses (never an illegal instruction)."""
    if CAN_RUN:
        CpuKernels.load()
        x, y, a, bv, tokens, slots = _lora_args()
        ops.lora_delta(x, y, a, bv, tokens, slots)
        assert not y.any()  # zero weights add nothing
        return
    with pytest.raises(RuntimeError, match="not enabled on this CPU"):
        ops.lora_delta(*_lora_args())
    q = torch.zeros(12, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not enabled"):
        ops.packed_attention(q, q, q, torch.tensor([0, 5]), torch.tensor([5, 6]), 6, 2)
    w = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="not enabled"):
        ops.add_layer_norm(q, q, w, w, 1e-12)
    with pytest.raises(RuntimeError, match="missing value for argument 'slots'"):  # the dispatcher's schema check
        ops.lora_delta(*_lora_args()[:5])


def test_the_fp32_lora_kernel_runs_where_avx2_does(ops: object) -> None:
    """fp32 arguments reach the AVX2 kernel once the detector has enabled it; a CPU without AVX2 refuses."""
    x, y, a, b = torch.ones(10, 16), torch.zeros(10, 24), torch.ones(3, 8, 16), torch.ones(3, 8, 24)
    args = _lora_args(x=x, y=y, a=a, bv=b)
    if not CAN_RUN_FP32:
        with pytest.raises(RuntimeError, match="not enabled on this CPU"):
            ops.lora_delta(*args)
        return
    CpuKernels.load()
    ops.lora_delta(*args)
    assert torch.equal(y, torch.full((10, 24), 16.0 * 8))  # each of 8 ranks: x·a = 16, times b = 1


@pytest.mark.parametrize(
    ("starts", "lengths", "longest", "heads", "message"),
    [
        ([0, 5], [5, 6], 6, 3, "must be an even integer"),  # 8 features in 3 heads
        ([0, 5], [5, 6], 6, 8, "must be an even integer"),  # heads of 1
        ([0, 6], [5, 6], 6, 2, "does not follow"),  # a gap between rows
        ([1, 5], [4, 6], 6, 2, "does not follow"),  # not from token 0
        ([0, 5], [5, 8], 8, 2, "the rows hold 13 tokens, q only 12"),
        ([0, 5], [5, 6], 5, 2, "longer than 5"),
        ([0, 5], [5, 6], 13, 2, "longest row 13 is outside 1..12"),
        ([0], [5, 6], 6, 2, "one entry per row"),
    ],
)
def test_packed_attention_refuses_rows_outside_the_tokens(ops: object, starts: list[int], lengths: list[int], longest: int, heads: int, message: str) -> None:
    q = torch.zeros(12, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        ops.packed_attention(q, q, q, torch.tensor(starts), torch.tensor(lengths), longest, heads)


def test_packed_attention_and_add_layer_norm_refuse_wrong_layouts(ops: object) -> None:
    q, w = torch.zeros(12, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16)
    rows = (torch.tensor([0, 5]), torch.tensor([5, 6]), 6)
    with pytest.raises(ValueError, match="one shape"):
        ops.packed_attention(q, q[:6], q, *rows, 2)
    with pytest.raises(ValueError, match="k must be a contiguous"):
        ops.packed_attention(q, q.t().contiguous().t(), q, *rows, 2)
    with pytest.raises(ValueError, match="starts must be a contiguous 1-D torch.int64"):
        ops.packed_attention(q, q, q, rows[0].int(), rows[1], 6, 2)
    with pytest.raises(ValueError, match="residual"):
        ops.add_layer_norm(q, q[:3], w, w, 1e-12)
    with pytest.raises(ValueError, match="weight and bias must be \\[8\\]"):
        ops.add_layer_norm(q, q, w[:4], w, 1e-12)
    with pytest.raises(ValueError, match="bias must be a contiguous 1-D torch.bfloat16"):
        ops.add_layer_norm(q, q, w, w.float(), 1e-12)
    wide = torch.zeros(2, 8200, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="hidden size 8200 is outside 1..8192"):
        ops.add_layer_norm(wide, wide, wide[0], wide[0], 1e-12)


@pytest.mark.parametrize("padding_free", [True, False])
def test_bf16_forward_with_the_kernel_matches_the_bmm_path(
    kernel: CpuKernels, tiny_bert_dir: Path, tmp_path: Path, padding_free: bool
) -> None:
    base = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu")
    make_peft_adapter(tiny_bert_dir, tmp_path, 3, 4, seed=7)
    weights = AdapterValidator(base.spec, max_rank=8, max_labels=4).parse(adapter_files(tmp_path))
    ids = base.tokenizer(["hi", "a much longer message about the weekly competition entry", "URGENT! you have won"])["input_ids"]
    results = []
    for use_kernel in (True, False):
        forward = BatchForward(base, n_slots=2, max_rank=8, max_labels=4, padding_free=padding_free, cpu_kernels=use_kernel)
        forward.lora.install(1, weights.lora, weights.scaling)
        assert forward.lora.layers and (forward.lora.path == "fused CPU kernel") == use_kernel
        forward.heads.install(1, weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
        rows = [Row(i, lora_slot=s, head_slots=(1,) if s == 1 else (), pooling=Pooling.MEAN) for i, s in zip(ids, [1, -1, 1])]
        results.append(forward(rows))
    for ours, theirs in zip(*results):
        assert float(np.dot(ours.embedding, theirs.embedding)) > 0.999
        for p, q in zip(ours.probabilities, theirs.probabilities):
            np.testing.assert_allclose(p, q, atol=2e-2)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], heads: int) -> torch.Tensor:
    """fp32 softmax attention row by row, from the bf16 inputs."""
    out, start = torch.zeros(q.shape), 0
    for n in lengths:
        rows = slice(start, start + n)
        split = [t[rows].float().view(n, heads, -1).transpose(0, 1) for t in (q, k, v)]  # [heads, n, d]
        context = torch.nn.functional.scaled_dot_product_attention(*split)
        out[rows] = context.transpose(0, 1).reshape(n, -1)
        start += n
    return out


@pytest.mark.parametrize(("lengths", "heads", "dim"), [([3, 17, 1, 16, 40], 12, 384), ([130, 2], 4, 256), ([5, 9], 2, 20)])
def test_packed_attention_matches_fp32_attention_row_by_row(kernel: CpuKernels, lengths: list[int], heads: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(3)
    total = sum(lengths) + 5  # and a bucket's filler
    q, k, v = (torch.randn(total, dim, generator=gen).mul(2).bfloat16() for _ in range(3))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    got = kernel.packed_attention(q, k, v, row_spans(mask), heads).float()
    expected = _reference_attention(q, k, v, lengths, heads)
    torch.testing.assert_close(got[: sum(lengths)], expected[: sum(lengths)], atol=2e-2, rtol=1e-2)  # bf16 output rounding
    assert torch.all(got[sum(lengths) :] == 0)
    odd = q[:, :15].contiguous()  # 5 heads of 3
    with pytest.raises(ValueError, match="even"):
        kernel.packed_attention(odd, odd, odd, row_spans(mask), 5)


def test_bf16_packed_encoder_with_the_kernel_matches_transformers(kernel: CpuKernels, tiny_bert_dir: Path) -> None:
    base = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu")
    texts = ["hi", "ok", "a much longer message about the weekly competition entry and its many rules", "yes"]
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        expected = base.model(**batch).last_hidden_state.float()
        packing = Packing.from_mask(batch["attention_mask"])
        encoder = PackedBertEncoder(base.model, kernel)
        assert encoder.kernels is kernel
        got = encoder(batch["input_ids"], batch["attention_mask"], packing).last_hidden_state.float()
    cosine = torch.nn.functional.cosine_similarity(got[real], expected[real], dim=-1)
    assert cosine.min() > 0.999


@pytest.mark.parametrize("hidden", [384, 40])  # 40: a masked tail of 8 lanes
def test_add_layer_norm_matches_fp32_layer_norm_of_the_sum(kernel: CpuKernels, hidden: int) -> None:
    gen = torch.Generator().manual_seed(5)
    x, residual = (torch.randn(37, hidden, generator=gen).mul(3).add(1).bfloat16() for _ in range(2))
    norm = nn.LayerNorm(hidden, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2, generator=gen)
        norm.bias.normal_(0, 0.2, generator=gen)
    expected = torch.nn.functional.layer_norm(x.float() + residual.float(), (hidden,), norm.weight, norm.bias, 1e-12)
    got = kernel.add_layer_norm(x, residual, norm.bfloat16())
    assert got is not None and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=1e-2)  # one bf16 rounding of the output
    assert kernel.add_layer_norm(x.float(), residual.float(), norm.float()) is None  # fp32: PyTorch's ops
    assert kernel.add_layer_norm(x.t(), residual.t(), norm) is None  # not row-major [T, H]


@pytest.mark.parametrize(("cpu_kernels_setting", "prepack_setting"), [("off", "auto"), ("auto", "off")])
async def test_the_server_reports_each_operations_path(
    tiny_bert_dir: Path, tmp_path: Path, cpu_kernels_setting: str, prepack_setting: str
) -> None:
    """The two settings reach the engine separately, and /metrics carries the path each operation took."""
    from prometheus_client import generate_latest

    from adaptgate.engine.prepacked import can_prepack
    from adaptgate.engine.rate import RowRate
    from adaptgate.engine.thread import EngineThread
    from adaptgate.metrics import Metrics
    from adaptgate.server import _engine
    from adaptgate.settings import Settings

    settings = Settings(
        data_dir=tmp_path, base_model=str(tiny_bert_dir), device="cpu", dtype="bfloat16",
        cpu_kernels=cpu_kernels_setting, prepack_linears=prepack_setting,
    )  # fmt: skip
    metrics, thread = Metrics(), EngineThread()
    engine = _engine(settings, load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu"), metrics, thread, RowRate())
    try:
        kernels = CAN_RUN and cpu_kernels_setting == "auto"
        lora = "avx512_bf16" if kernels else "pytorch"
        expected = operation_paths(lora=lora, attention=kernels, linears=can_prepack() and prepack_setting == "auto")
        assert engine.kernel_paths == expected
        assert engine.kernels == "paths " + ", ".join(f"{op}={path}" for op, path in expected.items())
        text = generate_latest(metrics.registry).decode()
        assert all(f'adaptgate_engine_kernel_info{{operation="{op}",path="{path}"}} 1.0' in text for op, path in expected.items())
    finally:
        await engine.stop()
        thread.shutdown()
