"""The Triton GEMM backend: a layer's base linear and every row's LoRA delta in one GEMM, `y = x·Wᵀ + b + (x·A_s)·B_s`.

The gathered bmm makes extra passes over the activations (gather, delta, scatter) that cost more than
the LoRA arithmetic itself; here the delta never leaves the GEMM: tokens are grouped by adapter into
tiles of `Blocks.m` rows (one adapter per tile, addressed through an index, so nothing is gathered or
copied), the K loop that accumulates x·Wᵀ also accumulates h = x·A_sᵀ from the x tile already loaded,
and the epilogue adds h·B_s before the one store of y. Cost: h is recomputed for each of the N/n column
tiles (r/n more MACs).

BatchForward uses it only when asked (`gpu_lora_kernel=True`; the gateway does not ask yet), and
bench/multi_adapter.py on CUDA runs it against the gathered-bmm backend in the same rounds. Tests run it
in Triton's interpreter on the CPU, where bf16 `tl.dot` is not supported, so those upcast (`DOT_F32`);
the GPU runs bf16 dots. Imports Triton: nothing imports this module unless that backend is asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from adaptgate.engine.lora.backend import LoraBackend
from adaptgate.engine.lora.mapping import LoraMapping

if TYPE_CHECKING:
    from adaptgate.engine.lora.layers import BatchedLoraLinear


@dataclass(frozen=True)
class Blocks:
    """Tile shape and launch parameters: a common bf16 GEMM choice for Hopper, untuned;
    bench/multi_adapter.py `--triton-blocks` tries others on a GPU."""

    m: int = 128
    n: int = 128
    k: int = 64
    warps: int = 8
    stages: int = 3

    @classmethod
    def parse(cls, text: str) -> Blocks:
        """"m,n,k,warps,stages", as the bench takes it."""
        return cls(*(int(v) for v in text.split(",")))


@dataclass(frozen=True)
class TileMap:
    """Tokens grouped by adapter: `rows` [tiles * block_m] is each tile row's token (-1: none), `slots`
    [tiles] each tile's engine slot (-1: no adapter, -2: an unused tile past the end)."""

    rows: torch.Tensor
    slots: torch.Tensor


def tile_map(token_slots: torch.Tensor, n_slots: int, block_m: int) -> TileMap:
    """Built on the tokens' device with no host sync: the grid is the upper bound
    cdiv(tokens, block_m) + groups, and tiles past the real ones are marked unused."""
    key = token_slots.long() + 1  # 0: no adapter, s + 1: slot s
    tokens = key.numel()
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(n_slots + 1, dtype=torch.long, device=key.device).scatter_add_(0, key, torch.ones_like(key))
    tiles_per_group = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_group, 0)
    sorted_key = key[order]
    position = torch.arange(tokens, device=key.device) - (torch.cumsum(counts, 0) - counts)[sorted_key]
    max_tiles = -(-tokens // block_m) + n_slots + 1
    rows = torch.full((max_tiles * block_m,), -1, dtype=torch.int32, device=key.device)
    rows[(tile_end - tiles_per_group)[sorted_key] * block_m + position] = order.to(torch.int32)
    group = torch.searchsorted(tile_end, torch.arange(max_tiles, device=key.device), right=True)
    slots = torch.where(group <= n_slots, group - 1, -2).to(torch.int32)
    return TileMap(rows, slots)


@triton.jit
def dot(a, b, f32: tl.constexpr):
    if f32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def lora_linear(
    x, w, bias, a, b, y, rows, tile_slots,
    N: tl.constexpr, K: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    slot = tl.load(tile_slots + tl.program_id(0))
    if slot >= -1:
        token = tl.load(rows + tl.program_id(0) * BM + tl.arange(0, BM))
        real = token >= 0
        token = tl.where(real, token, 0).to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        ranks = tl.arange(0, RP)
        a_rows = (tl.maximum(slot, 0) * R + ranks[None, :]).to(tl.int64)
        a_real = (ranks[None, :] < R) & (slot >= 0)  # a tile without an adapter loads zeros: no branch in the loop
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        h = tl.zeros((BM, RP), dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            xk = tl.load(x + token[:, None] * K + ks[None, :], mask=real[:, None] & (ks[None, :] < K), other=0.0)
            wk = tl.load(w + cols[None, :].to(tl.int64) * K + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
            acc += dot(xk, wk, DOT_F32)
            ak = tl.load(a + a_rows * K + ks[:, None], mask=a_real & (ks[:, None] < K), other=0.0)
            h += dot(xk, ak, DOT_F32)
        if slot >= 0:
            b_rows = (slot * R + ranks[:, None]).to(tl.int64)
            bt = tl.load(b + b_rows * N + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < N), other=0.0)
            acc += dot(h.to(bt.dtype), bt, DOT_F32)
        if HAS_BIAS:
            acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out = y + token[:, None] * N + cols[None, :]
        tl.store(out, acc.to(y.dtype.element_ty), mask=real[:, None] & (cols[None, :] < N))


class TritonLoraLinear:
    """The fused kernel (compiled by Triton on first call per shape); see the module docstring."""

    def __init__(self, blocks: Blocks | None = None) -> None:
        self.blocks = blocks or Blocks()
        self._interpreted = os.environ.get("TRITON_INTERPRET") == "1"

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, tiles: TileMap
    ) -> torch.Tensor:
        """x [T, in]; weight [out, in] (nn.Linear's); a [S, r, in]; b [S, r, out] with the scaling folded in,
        all contiguous on one device; returns y [T, out] in x's dtype."""
        tokens, fan_in = x.shape
        fan_out, rank = weight.shape[0], a.shape[1]
        y = torch.empty(tokens, fan_out, dtype=x.dtype, device=x.device)
        blocks = self.blocks
        grid = (tiles.slots.numel(), -(-fan_out // blocks.n))
        lora_linear[grid](
            x, weight, bias if bias is not None else weight, a, b, y, tiles.rows, tiles.slots,
            N=fan_out, K=fan_in, R=rank, HAS_BIAS=bias is not None, BM=blocks.m, BN=blocks.n, BK=blocks.k,
            RP=max(16, 1 << (rank - 1).bit_length()), DOT_F32=self._interpreted, num_warps=blocks.warps, num_stages=blocks.stages,
        )  # fmt: skip
        return y


class TritonGemm(LoraBackend):
    """Base and deltas in one GEMM per layer; the mapping as tiles of tokens grouped by slot, built on the device.

    Reads the base weight as nn.Linear's [out, in] and B as [slots, r, out]: the default layout, so an
    engine may switch between this and the gathered bmm (the bench's A/B) without re-storing adapters.
    """

    name = "fused Triton GEMM"
    kernel = "triton"

    def __init__(self, gemm: TritonLoraLinear | None = None) -> None:
        super().__init__()
        self.gemm = gemm or TritonLoraLinear()
        self._tiles: dict[int, TileMap] = {}

    def prepare(self, mapping: LoraMapping | None) -> None:
        super().prepare(mapping)
        self._tiles.clear()

    def linear(self, layer: BatchedLoraLinear, x: torch.Tensor) -> torch.Tensor:
        if self.mapping is None:
            return layer.base(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        tiles = self.tiles(self.mapping, x, len(flat), layer.lora_a.shape[0])
        y = self.gemm(flat, layer.base.weight, layer.base.bias, layer.lora_a, layer.lora_b, tiles)
        return y.view(*x.shape[:-1], y.shape[-1])

    def add_delta(self, layer: BatchedLoraLinear, x: torch.Tensor, y: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
        raise NotImplementedError("the Triton GEMM computes base and deltas together (TritonGemm.linear)")

    def tiles(self, mapping: LoraMapping, x: torch.Tensor, tokens: int, n_slots: int) -> TileMap:
        """x as [tokens, in]: each token's slot (-1: none, as for a packed bucket's filler), grouped into tiles."""
        packed = mapping.is_packed(x)
        per_row = 1 if packed else tokens // len(x)
        key = 0 if packed else per_row
        if key not in self._tiles:
            device = mapping.slots.device
            row_slot = torch.full((mapping.batch_rows,), -1, dtype=torch.long, device=device)
            row_slot[mapping.rows] = mapping.slots
            if packed:
                assert mapping.packing is not None
                token_slot = torch.full((tokens,), -1, dtype=torch.long, device=device)
                owners = torch.div(mapping.packing.index, mapping.packing.width, rounding_mode="floor")
                token_slot[: len(owners)] = row_slot[owners]
            else:
                token_slot = row_slot.repeat_interleave(per_row)
            self._tiles[key] = tile_map(token_slot, n_slots, self.gemm.blocks.m)
        return self._tiles[key]
