"""The LoRA backend seam: every backend this machine can run gives the exact deltas on one mixed batch,
padded and packed, in bf16 and fp32, and the engine picks one backend, once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from adaptgate.engine.lora import GatheredBmm, LoraBackend, LoraLayers, LoraMapping, select_backend
from adaptgate.engine.packed import Packing

LENGTHS = [3, 9, 1, 6]
FAN_IN, FAN_OUT, RANKS = 40, 56, (8, 3)
SCALING = 2.0


def _cpu_kernel(dtype: torch.dtype) -> LoraBackend | None:
    """The AVX512-BF16 kernel for bf16, the AVX2 one for fp32, where this CPU runs it."""
    from adaptgate.engine.cpu_kernels import CpuKernels
    from adaptgate.engine.lora.cpu_kernel import CpuKernel

    kernels = CpuKernels.try_load()
    return CpuKernel(kernels, dtype) if kernels is not None and kernels.supports_lora(dtype, torch.device("cpu"), 8) else None


def _triton_gemm(dtype: torch.dtype = torch.bfloat16) -> LoraBackend | None:
    try:
        from adaptgate.engine.lora.triton_gemm import TritonGemm
    except ImportError:  # triton is a dev extra
        return None
    return TritonGemm() if dtype != torch.float32 else None  # a half-precision GEMM


def _gathered_bmm(dtype: torch.dtype) -> LoraBackend:
    return GatheredBmm()


BACKENDS: dict[str, Callable[[torch.dtype], LoraBackend | None]] = {
    "gathered bmm": _gathered_bmm,
    "fused CPU kernel": _cpu_kernel,
    "fused Triton GEMM": _triton_gemm,
}


def _adapters() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(r, FAN_IN, generator=gen) * 0.3, torch.randn(FAN_OUT, r, generator=gen) * 0.3) for r in RANKS]


def _layers(backend: LoraBackend, dtype: torch.dtype = torch.bfloat16) -> LoraLayers:
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(FAN_IN, FAN_OUT)}).to(dtype)
    layers = LoraLayers(model, n_slots=2, max_rank=8, backend=backend)
    for slot, (a, b) in enumerate(_adapters()):
        layers.install(slot, {"proj": (a, b)}, SCALING)
    return layers


def _exact(layers: LoraLayers, x: torch.Tensor, token_slots: list[int]) -> torch.Tensor:
    """fp32: the base output plus each token's delta, from PEFT's a and b (A as the layer stores it, in x's dtype)."""
    with torch.no_grad():
        y = layers.layers["proj"].base(x).float()
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            a, b = _adapters()[slot]
            y[t] += SCALING * (x[t].float() @ a.to(x.dtype).float().t()) @ b.float().t()
    return y


def _run(layers: LoraLayers, x: torch.Tensor, row_slots: list[int], packing: Packing | None) -> torch.Tensor:
    layers.prepare(row_slots, torch.device("cpu"), packing)
    try:
        with torch.inference_mode():
            return layers.model["proj"](x).float()
    finally:
        layers.prepare([], torch.device("cpu"))


def _backend(name: str, dtype: torch.dtype = torch.bfloat16) -> LoraBackend:
    backend = BACKENDS[name](dtype)
    if backend is None:
        pytest.skip(f"{name} does not run {dtype} on this machine")
    return backend


@pytest.mark.parametrize(
    "row_slots", [[1, -1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1], [0, -1, 0, 0]], ids=["some rows", "every row", "one adapter", "one adapter, some rows"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_adds_the_exact_deltas_on_padded_and_packed_rows(name: str, row_slots: list[int], dtype: torch.dtype) -> None:
    layers = _layers(_backend(name, dtype), dtype)
    assert layers.path == name
    width = max(LENGTHS)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in LENGTHS])
    packing = Packing.from_mask(mask)
    gen = torch.Generator().manual_seed(2)
    padded = torch.randn(len(LENGTHS), width, FAN_IN, generator=gen).to(dtype)
    packed = packing.pack(padded)  # the real tokens, then the bucket's filler
    pooled = padded[:, 0].contiguous()  # what a packed batch's pooler sees: one vector per row
    token_rows = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS)).tolist()
    filler = packing.bucket - packing.tokens
    cases = [
        (padded, None, [s for s in row_slots for _ in range(width)]),
        (packed, packing, [row_slots[r] for r in token_rows] + [-1] * filler),
        (pooled, packing, row_slots),
    ]
    for x, pack, token_slots in cases:
        got = _run(layers, x, row_slots, pack).reshape(-1, FAN_OUT)
        exact = _exact(layers, x.reshape(-1, FAN_IN), token_slots)
        scale = float(exact.abs().max())
        torch.testing.assert_close(got, exact, atol=2e-2 * scale, rtol=0)
        if name != "fused Triton GEMM":  # which computes the base in its own GEMM, rounded once
            untouched = torch.tensor(token_slots) < 0
            torch.testing.assert_close(got[untouched], exact[untouched], atol=0, rtol=0)  # no delta where no adapter


def test_a_batch_without_adapters_runs_the_base_alone() -> None:
    layers = _layers(GatheredBmm())
    x = torch.randn(2, 5, FAN_IN).bfloat16()
    assert layers.prepare([-1, -1], torch.device("cpu")) is None
    with torch.inference_mode():
        assert torch.equal(layers.model["proj"](x), layers.layers["proj"].base(x))


def test_the_mapping_tells_packed_tokens_from_rows_by_shape() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    packing = Packing.from_mask(mask)
    mapping = LoraMapping.build([0, -1], torch.device("cpu"), packing)
    assert mapping is not None and not mapping.every_row
    assert mapping.is_packed(torch.zeros(packing.bucket, 4))
    assert not mapping.is_packed(torch.zeros(2, 4))  # the pooler's rows
    assert not mapping.is_packed(torch.zeros(2, 4, 4))  # a padded batch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_pooler_shaped_like_the_packed_tokens_gets_the_same_deltas(name: str, dtype: torch.dtype) -> None:
    """Eight one-token rows fill a bucket of eight exactly: packed token i is row i, so either reading is right."""
    layers = _layers(_backend(name, dtype), dtype)
    row_slots = [1, -1, 0, 1, 0, -1, -1, 1]
    packing = Packing.from_mask(torch.ones(8, 1, dtype=torch.long))
    x = torch.randn(8, FAN_IN, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert packing.bucket == len(row_slots)
    exact = _exact(layers, x, row_slots)
    for pack in (packing, None):
        torch.testing.assert_close(_run(layers, x, row_slots, pack), exact, atol=2e-2 * float(exact.abs().max()), rtol=0)


def test_the_engine_picks_one_backend_for_every_layer() -> None:
    """Triton asked for but a target is not a plain half-precision nn.Linear: every layer keeps the gathered bmm."""
    gemm = _triton_gemm()
    if gemm is None:
        pytest.skip("no triton here")
    fused = gemm.gemm  # type: ignore[attr-defined]
    half = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)}).to(torch.bfloat16)
    assert select_backend(half, 8, fused_gpu=fused).name == "fused Triton GEMM"
    mixed = nn.ModuleDict({"a": nn.Linear(8, 8).to(torch.bfloat16), "b": nn.Linear(8, 8)})  # b in fp32
    assert select_backend(mixed, 8, fused_gpu=fused).name == "gathered bmm"
    assert select_backend(half, 8).name == "gathered bmm"
