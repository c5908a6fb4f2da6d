"""The fused GPU LoRA GEMM (engine.lora.triton_gemm) gives base + delta for every token, on a GPU or, elsewhere,
in Triton's interpreter on the CPU (bf16 dots upcast there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")  # without a GPU, tests/conftest.py has it run kernels in its interpreter

from adaptgate.adapters.validation import AdapterValidator  # noqa: E402
from adaptgate.engine.forward import BatchForward  # noqa: E402
from adaptgate.engine.lora import LoraLayers  # noqa: E402
from adaptgate.engine.lora.triton_gemm import Blocks, TritonGemm, TritonLoraLinear, tile_map  # noqa: E402
from adaptgate.engine.model import load_base_model  # noqa: E402
from adaptgate.engine.packed import Packing  # noqa: E402
from adaptgate.engine.pooling import Pooling  # noqa: E402
from adaptgate.engine.rows import Row  # noqa: E402
from tests.unit.peft_adapters import adapter_files, make_peft_adapter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_tile_map_gives_every_token_one_place_in_a_tile_of_its_own_slot() -> None:
    token_slots = torch.tensor([2, -1, 0, 2, 2, 0, -1, 1] * 40 + [3] * 130)  # slot 3 spans two tiles
    tiles = tile_map(token_slots.to(DEVICE), n_slots=5, block_m=64)
    rows, slots = tiles.rows.cpu().view(-1, 64), tiles.slots.cpu()
    placed = rows[rows >= 0]
    assert sorted(placed.tolist()) == list(range(len(token_slots)))  # each token exactly once
    for tile, slot in enumerate(slots.tolist()):
        members = rows[tile][rows[tile] >= 0]
        if slot == -2:
            assert len(members) == 0
        else:
            assert len(members) > 0 and set(token_slots[members].tolist()) == {slot}
    assert (slots == 3).sum() == 3 and (slots == 4).sum() == 0  # 130 tokens: 3 tiles of 64; slot 4 has none
    assert len(slots) >= -(-len(token_slots) // 64) + 6  # the grid's upper bound, without a host sync


def _exact(x: torch.Tensor, linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    y = x.float() @ linear.weight.float().t() + linear.bias.float()
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            y[t] += (x[t].float() @ a[slot].float().t()) @ b[slot].float()
    return y


@pytest.mark.parametrize(("fan_in", "fan_out", "rank"), [(96, 80, 8), (64, 200, 16)])
def test_fused_linear_is_the_base_plus_each_tokens_delta(fan_in: int, fan_out: int, rank: int) -> None:
    """Feature tails (96 and 200 are not multiples of the 64- and 128-wide blocks), rank 8 padded to 16,
    tokens without an adapter, and more tokens than one tile."""
    torch.manual_seed(0)
    linear = nn.Linear(fan_in, fan_out).to(DEVICE, torch.bfloat16)
    a = (torch.randn(4, rank, fan_in) * 0.3).to(DEVICE, torch.bfloat16)
    b = (torch.randn(4, rank, fan_out) * 0.3).to(DEVICE, torch.bfloat16)
    fused = TritonLoraLinear(Blocks(m=64, n=128, k=64) if fan_out > 128 else None)
    token_slots = torch.randint(-1, 4, (fused.blocks.m + 45,))
    x = torch.randn(len(token_slots), fan_in).to(DEVICE, torch.bfloat16)
    y = fused(x, linear.weight, linear.bias, a, b, tile_map(token_slots.to(DEVICE), 4, fused.blocks.m))
    exact = _exact(x.cpu(), linear.cpu(), a.cpu(), b.cpu(), token_slots)
    torch.testing.assert_close(y.float().cpu(), exact, atol=2e-2 * float(exact.abs().max()), rtol=0)
    base_only = x.float().cpu() @ linear.weight.float().cpu().t() + linear.bias.float().cpu()
    none = token_slots < 0
    assert (y.float().cpu()[~none] - base_only[~none]).abs().max() > 0.1  # the deltas did act


@pytest.mark.parametrize("packed", [False, True])
def test_lora_layers_on_the_fused_gpu_path_match_the_bmm_path(packed: bool) -> None:
    torch.manual_seed(1)
    lengths, row_slots = [5, 9, 2, 7], [1, -1, 0, 1]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    adapters = [(torch.randn(8, 48) * 0.3, torch.randn(72, 8) * 0.3) for _ in range(2)]
    shape = (Packing.from_mask(mask).gather.numel(), 48) if packed else (4, 9, 48)
    x = torch.randn(*shape).to(DEVICE, torch.bfloat16)
    outputs = []
    for fused in (TritonLoraLinear(), None):
        torch.manual_seed(2)
        model = nn.ModuleDict({"proj": nn.Linear(48, 72)}).to(DEVICE, torch.bfloat16)
        layers = LoraLayers(model, n_slots=2, max_rank=8, fused_gpu=fused)
        for slot, (a, b) in enumerate(adapters):
            layers.install(slot, {"proj": (a, b)}, scaling=2.0)
        assert (layers.path == TritonGemm.name) == (fused is not None)
        layers.prepare(row_slots, DEVICE, Packing.from_mask(mask.to(DEVICE)) if packed else None)
        with torch.inference_mode():
            out = layers.model["proj"](x).float().cpu()
        outputs.append(out[: sum(lengths)] if packed else out)
    torch.testing.assert_close(outputs[0], outputs[1], atol=3e-2 * float(outputs[1].abs().max()), rtol=0)


def _forward(base_dir: Path, adapter_dir: Path, fused: TritonLoraLinear | None, rows_ids: list[list[int]], slots: list[int]) -> list:
    base = load_base_model(base_dir, dtype="bfloat16", device=str(DEVICE))
    weights = AdapterValidator(base.spec, max_rank=8, max_labels=4).parse(adapter_files(adapter_dir))
    forward = BatchForward(base, n_slots=2, max_rank=8, max_labels=4, cpu_kernels=False)
    if fused is not None:  # what gpu_lora_kernel=True selects on CUDA; set by hand so the CPU can run it too
        forward.lora.use(TritonGemm(fused))
    forward.lora.install(1, weights.lora, weights.scaling)
    forward.heads.install(1, weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
    rows = [Row(ids, lora_slot=s, head_slots=(1,) if s == 1 else (), pooling=Pooling.MEAN) for ids, s in zip(rows_ids, slots)]
    return forward(rows)


@pytest.mark.parametrize("slots", [[1, -1, 1], [1, 1, 1]])
def test_a_whole_bert_forward_on_the_fused_gpu_path_matches_the_bmm_path(tiny_bert_dir: Path, tmp_path: Path, slots: list[int]) -> None:
    """Every linear carries LoRA (the pooler's too), on padded and packed batches (the short row pads
    to the long one's width and makes the engine pack)."""
    make_peft_adapter(tiny_bert_dir, tmp_path, 3, 4, seed=7)
    tokenizer = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu").tokenizer
    for texts in (["hi there", "a longer message about the weekly competition", "URGENT! you have won"], ["hi", "x " * 60, "ok"]):
        ids = tokenizer(texts)["input_ids"]
        ours, theirs = (_forward(tiny_bert_dir, tmp_path, f, ids, slots) for f in (TritonLoraLinear(), None))
        for a, b in zip(ours, theirs):
            assert float(np.dot(a.embedding, b.embedding)) > 0.999
            for p, q in zip(a.probabilities, b.probabilities):
                np.testing.assert_allclose(p, q, atol=2e-2)


def test_a_layer_on_the_cpu_kernel_keeps_it_over_the_triton_gemm() -> None:
    """The CPU kernel stores B interleaved for itself; the Triton GEMM must not read that layout."""
    from adaptgate.engine.cpu_kernels import CpuKernels

    kernels = CpuKernels.try_load()
    if kernels is None or not kernels.supports_lora(torch.bfloat16, torch.device("cpu"), 8):
        pytest.skip("no fused bf16 CPU kernels on this machine")
    model = nn.ModuleDict({"proj": nn.Linear(48, 72)}).to(torch.bfloat16)
    layers = LoraLayers(model, n_slots=1, max_rank=8, kernel=kernels, fused_gpu=TritonLoraLinear())
    layers.install(0, {"proj": (torch.randn(8, 48), torch.randn(72, 8))}, scaling=1.0)
    assert layers.path == "fused CPU kernel" and layers.layers["proj"].lora_b.dim() == 4
