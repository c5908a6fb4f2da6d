"""The gathered-bmm backend: the reference every other backend is held to, and the path wherever no kernel runs.

Padded rows: two batched matmuls over the rows that carry an adapter (in place when every row does).
Packed tokens: the LoRA rows' tokens cut into equal chunks, each within one row, and the same two
matmuls on that grid (`LoraChunks`). A is read transposed from PEFT's [r, in] layout, which the CPU's
batched GEMM runs faster than a copy laid out [in, r].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from adaptgate.engine.lora.backend import LoraBackend
from adaptgate.engine.lora.mapping import LoraMapping
from adaptgate.engine.packed import Packing

if TYPE_CHECKING:
    from adaptgate.engine.lora.layers import BatchedLoraLinear

# Chunk lengths the packed path may cut rows into, and what one more chunk costs in padded positions
# (each bmm batch entry has a fixed overhead, which this expresses as token positions).
CHUNK_LENGTHS = (8, 16, 32, 64, 128, 256, 512)
CHUNK_COST_POSITIONS = 16


def chunk_length(lengths: list[int]) -> int:
    """The chunk length that makes the cheapest grid for rows of these lengths: padding against chunk count."""

    def cost(c: int) -> int:
        chunks = sum(-(-n // c) for n in lengths)
        return chunks * (c + CHUNK_COST_POSITIONS)

    return min(CHUNK_LENGTHS, key=cost)


@dataclass(frozen=True)
class LoraChunks:
    """Packed tokens of the LoRA rows cut into equal chunks, each within one row: the grid of the packed path.

    Padding every row to the batch's longest (`Packing.unpack`) would make a 13-token sentence next to a
    50-token one pay for 50; chunks of `length` tokens pay at most `length - 1` pad positions per row.
    """

    gather: torch.Tensor  # [chunks * length] packed token per grid position (a row's first token at pads)
    slots: torch.Tensor  # [chunks] engine slot of each chunk's row
    tokens: torch.Tensor  # [t] the packed tokens that carry LoRA, in order
    positions: torch.Tensor  # [t] where each of them sits in the grid
    length: int
    every_token: bool  # tokens == all real packed tokens: add the deltas in place, no scatter

    @classmethod
    def build(cls, packing: Packing, rows: torch.Tensor, slots: torch.Tensor) -> LoraChunks:
        """Index arithmetic on the CPU (a few hundred rows at most), one copy of each index to the device."""
        all_lengths = packing.lengths
        rows = rows.cpu()
        lengths, first = all_lengths[rows], packing.starts[rows]  # [n] each
        length = chunk_length(lengths.tolist())
        per_row = torch.div(lengths + length - 1, length, rounding_mode="floor")  # [n] chunks of each row
        grid_start = (torch.cumsum(per_row, 0) - per_row) * length  # [n] grid position of each row's first token
        owner = torch.repeat_interleave(torch.arange(len(rows)), per_row * length)  # [grid] row of each position
        in_row = torch.arange(len(owner)) - grid_start[owner]
        gather = first[owner] + torch.where(in_row < lengths[owner], in_row, 0)
        token_row = torch.repeat_interleave(torch.arange(len(rows)), lengths)  # [t]
        token_in_row = torch.arange(len(token_row)) - (torch.cumsum(lengths, 0) - lengths)[token_row]
        device = packing.index.device
        return cls(
            gather=gather.to(device),
            slots=torch.repeat_interleave(slots.cpu(), per_row).to(device),
            tokens=(first[token_row] + token_in_row).to(device),
            positions=(grid_start[token_row] + token_in_row).to(device),
            length=length,
            every_token=len(rows) == packing.rows,
        )


class GatheredBmm(LoraBackend):
    """`bmm(bmm(x_rows, A_s), B_s)` over gathered slots; the grid of packed chunks when the batch is packed."""

    name = "gathered bmm"

    def __init__(self) -> None:
        super().__init__()
        self._chunks: LoraChunks | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the last input on the grid: q, k, v share it

    def prepare(self, mapping: LoraMapping | None) -> None:
        super().prepare(mapping)
        self._chunks = self._last = None

    def add_delta(self, layer: BatchedLoraLinear, x: torch.Tensor, y: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
        if mapping.every_row and mapping.single_slot is not None:
            return self._one_adapter(layer, x, y, mapping, mapping.single_slot)
        if mapping.is_packed(x):
            return self._packed(layer, x, y, mapping)
        rows, slots = mapping.rows, mapping.slots
        if mapping.every_row:  # the common mixed-traffic case: accumulate in place, no gather/scatter
            shrunk = torch.bmm(x.reshape(len(rows), -1, x.shape[-1]), _a(layer, slots))  # [B, T, r]
            y.view(len(rows), -1, y.shape[-1]).baddbmm_(shrunk, layer.lora_b[slots])  # y as [B, T, out], in place
            return y
        xs = x.index_select(0, rows).reshape(len(rows), -1, x.shape[-1])  # [n, T, in]; T=1 for BERT's pooler
        delta = torch.bmm(torch.bmm(xs, _a(layer, slots)), layer.lora_b[slots])  # [n, T, out]
        return y.index_add_(0, rows, delta.reshape(len(rows), *y.shape[1:]).to(y.dtype))

    @staticmethod
    def _one_adapter(
        layer: BatchedLoraLinear, x: torch.Tensor, y: torch.Tensor, mapping: LoraMapping, slot: int
    ) -> torch.Tensor:
        """Every row carries the same adapter (one tenant's traffic): two plain matmuls over all tokens, in
        place, with no per-row copies of A and B and no chunk grid. A packed bucket's filler gets no delta."""
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if mapping.packing is not None and mapping.is_packed(x):
            flat_x, flat_y = flat_x[: mapping.packing.tokens], flat_y[: mapping.packing.tokens]
        flat_y.addmm_(flat_x @ layer.lora_a[slot].t(), layer.lora_b[slot])  # [t, r] · [r, out]
        return y

    def chunks(self, mapping: LoraMapping) -> LoraChunks:
        """The packed grid, built on the batch's first LoRA layer."""
        if self._chunks is None:
            assert mapping.packing is not None
            self._chunks = LoraChunks.build(mapping.packing, mapping.rows, mapping.slots)
        return self._chunks

    def _on_grid(self, x: torch.Tensor, chunks: LoraChunks) -> torch.Tensor:
        """[T, in] packed tokens -> [chunks, length, in]."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        grid = x.index_select(0, chunks.gather).view(-1, chunks.length, x.shape[-1])
        self._last = (x, grid)
        return grid

    def _packed(self, layer: BatchedLoraLinear, x: torch.Tensor, y: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
        """x: [T, in], y: [T, out] packed tokens; the deltas run on the chunk grid (rank-sized work only)."""
        chunks = self.chunks(mapping)
        grid = self._on_grid(x, chunks)  # [chunks, length, in]
        shrunk = torch.bmm(grid, _a(layer, chunks.slots))  # [chunks, length, r]
        delta = torch.bmm(shrunk, layer.lora_b.index_select(0, chunks.slots)).view(-1, y.shape[-1])  # [grid, out]
        delta = delta.index_select(0, chunks.positions)  # [t, out]
        if chunks.every_token:
            y[: len(delta)].add_(delta)  # the bucket's filler rows (packed.token_bucket) get no delta
            return y
        return y.index_add_(0, chunks.tokens, delta)


def _a(layer: BatchedLoraLinear, slots: torch.Tensor) -> torch.Tensor:
    """[n, in, r]: each entry's A, as a transposed view of the gathered [n, r, in]."""
    return layer.lora_a.index_select(0, slots).transpose(1, 2)
