"""Many LoRA adapters in one forward pass (the S-LoRA / Punica idea, vLLM's batch-wide mapping).

Every wrapped linear keeps stacked, rank-padded adapter weights for all engine slots:
A as [slots, r_max, in] (PEFT's own layout; `bmm` reads it transposed, which the CPU's batched
GEMM runs faster than a copy laid out [in, r]) and B as [slots, r_max, out] with the adapter's
scaling folded into B.
A batch carries one slot per row (`LoraBatch`); the frozen `x·W` runs once for the whole batch
and only rows that have an adapter pay for their delta. No per-adapter loop, no merge.
On a CPU with AVX512-BF16 the delta is one fused kernel call per layer (`cpu_kernels`, r_max then padded
to a multiple of 8 and B stored [slots, r_max/2, out, 2]); on CUDA when asked, the base matmul and the
deltas are one Triton GEMM (engine.lora_triton); elsewhere, and as the tests' reference, two gathered `bmm`s.

Targets are `nn.Linear` (weight [out, in]) or GPT-2's `transformers.pytorch_utils.Conv1D`
(weight [in, out]; PEFT sets fan_in_fan_out=True for it). PEFT still saves A as [r, in] and
B as [out, r] for both, and fan_in_fan_out only matters when merging, so the delta is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptgate.engine.int8 import Int8Linear
from adaptgate.engine.cpu_kernels import CpuKernels, kernel_rank
from adaptgate.engine.packed import Packing
from adaptgate.engine.prepacked import PrepackedLinear

if TYPE_CHECKING:  # imports Triton, which only the GPU path needs
    from adaptgate.engine.lora_triton import TileMap, TritonLoraLinear


def linear_in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a LoRA-targetable module (the types PEFT's `all-linear` picks), None for anything else.

    Conv1D stores its weight transposed ([in, out], `nx`/`nf`), so nn.Linear's attributes do not exist there.
    """
    if isinstance(module, (nn.Linear, Int8Linear, PrepackedLinear)):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


# Chunk lengths the packed path may cut rows into, and what one more chunk costs in padded positions
# (each bmm batch entry has a fixed overhead; on 2 CPU threads it is about that of 16 token positions).
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
        all_lengths = torch.bincount(torch.div(packing.index, packing.width, rounding_mode="floor").cpu(), minlength=packing.rows)
        rows = rows.cpu()
        lengths, first = all_lengths[rows], (torch.cumsum(all_lengths, 0) - all_lengths)[rows]  # [n] each
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


@dataclass
class LoraBatch:
    """Rows of the current batch that carry an adapter, and the slot of each. Set by the engine per forward."""

    rows: torch.Tensor | None = None  # [n] row indices into the batch
    slots: torch.Tensor | None = None  # [n] engine slot per such row
    every_row: bool = False  # n == batch size: no row gather/scatter needed
    packing: Packing | None = None  # set while inputs are packed tokens [T, in] (the padding-free encoder)
    _chunks: LoraChunks | None = field(default=None, repr=False)
    _token_slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    _tiles: dict[int, TileMap] = field(default_factory=dict, repr=False)
    # The last input gathered onto the chunk grid: query, key and value read the same one.
    _last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def chunks(self) -> LoraChunks:
        """The packed path's chunk grid, built on the first LoRA layer of the batch."""
        if self._chunks is None:
            assert self.packing is not None and self.rows is not None and self.slots is not None
            self._chunks = LoraChunks.build(self.packing, self.rows, self.slots)
        return self._chunks

    def on_grid(self, x: torch.Tensor) -> torch.Tensor:
        """[T, in] packed tokens -> [chunks, length, in]."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        chunks = self.chunks()
        grid = x.index_select(0, chunks.gather).view(-1, chunks.length, x.shape[-1])
        self._last = (x, grid)
        return grid

    def token_slots(self, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused kernel's mapping, [n] each: which rows of x (as [tokens, in]) carry LoRA, and their slots.

        Packed, x holds the packed tokens (and the bucket's filler, which gets none); padded, each batch
        row is `per_row` rows of x (its positions, pads included: they are computed anyway).
        """
        key = 0 if self.packing is not None else per_row
        if key not in self._token_slots:
            tokens, slots = self._packed_token_slots() if key == 0 else self._padded_token_slots(per_row)
            self._token_slots[key] = tokens.contiguous(), slots.contiguous()  # int64 on the CPU: the kernel's index arrays
        return self._token_slots[key]

    def _packed_token_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.packing is not None and self.rows is not None and self.slots is not None
        row_slot = torch.full((self.packing.rows,), -1, dtype=torch.long)
        row_slot[self.rows.cpu()] = self.slots.cpu()
        token_slot = row_slot[torch.div(self.packing.index.cpu(), self.packing.width, rounding_mode="floor")]  # [T]
        tokens = torch.arange(len(token_slot)) if self.every_row else (token_slot >= 0).nonzero().squeeze(1)
        return tokens, token_slot[tokens]

    def _padded_token_slots(self, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.rows is not None and self.slots is not None
        rows, slots = self.rows.cpu(), self.slots.cpu()
        tokens = (rows.unsqueeze(1) * per_row + torch.arange(per_row)).reshape(-1)
        return tokens, torch.repeat_interleave(slots, per_row)

    def tiles(self, tokens: int, per_row: int, n_slots: int, block_m: int) -> TileMap:
        """The fused GPU kernel's mapping for x as [tokens, in]: tokens grouped by slot, built on the device."""
        from adaptgate.engine.lora_triton import tile_map

        key = 0 if self.packing is not None else per_row
        if key not in self._tiles:
            assert self.rows is not None and self.slots is not None
            device = self.slots.device
            batch_rows = self.packing.rows if self.packing is not None else tokens // per_row
            row_slot = torch.full((batch_rows,), -1, dtype=torch.long, device=device)
            row_slot[self.rows] = self.slots
            token_slot = torch.full((tokens,), -1, dtype=torch.long, device=device)  # a packed bucket's filler: none
            if self.packing is not None:
                owners = torch.div(self.packing.index, self.packing.width, rounding_mode="floor")
                token_slot[: len(owners)] = row_slot[owners]
            else:
                token_slot = row_slot.repeat_interleave(per_row)
            self._tiles[key] = tile_map(token_slot, n_slots, block_m)
        return self._tiles[key]

    def reset(self) -> None:
        self._chunks = self._last = None
        self._token_slots.clear()
        self._tiles.clear()


class BatchedLoraLinear(nn.Module):
    """`y = base(x)` for all rows, plus `(x·A_s)·B_s` for each row's slot s.

    `base` is an nn.Linear (`x·Wᵀ + b`) or a Conv1D (`x·W + b`); only its (in, out) matter here.
    """

    def __init__(
        self,
        base: nn.Module,
        batch: LoraBatch,
        n_slots: int,
        max_rank: int,
        kernel: CpuKernels | None = None,
        fused_gpu: TritonLoraLinear | None = None,
    ) -> None:
        super().__init__()
        shape = linear_in_out(base)
        if shape is None:
            raise TypeError(f"LoRA can wrap nn.Linear or Conv1D, not {type(base).__name__}")
        fan_in, fan_out = shape
        self.base = base
        self.batch = batch
        reference = base.bias if isinstance(base, Int8Linear) else base.weight
        dtype: torch.dtype = getattr(base, "compute_dtype", reference.dtype)
        self.kernel = kernel if kernel is not None and kernel.supports_lora(dtype, reference.device, max_rank) else None
        plain = self.kernel is None and type(base) is nn.Linear  # the Triton GEMM reads B as [slots, r, out]
        self.fused_gpu = fused_gpu if plain and dtype in (torch.bfloat16, torch.float16) else None
        if self.kernel is not None:
            max_rank = kernel_rank(max_rank)
        shape_a = (n_slots, max_rank, fan_in)  # [slots, r_max, in]
        shape_b = (n_slots, max_rank // 2, fan_out, 2) if self.kernel else (n_slots, max_rank, fan_out)
        kw = {"dtype": dtype, "device": reference.device}
        self.register_buffer("lora_a", torch.zeros(shape_a, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(shape_b, **kw), persistent=False)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """a: [r, in] and b: [out, r] as PEFT stores them; zero-padded up to r_max."""
        rank = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_a[slot, :rank, :] = a.to(self.lora_a.dtype)
        scaled = torch.zeros(self.lora_a.shape[1], b.shape[0])  # [r_max, out]
        scaled[:rank] = b.t().float() * scaling
        if self.kernel is not None:  # rank pairs interleaved: [r_max/2, out, 2]
            scaled = scaled.view(-1, 2, b.shape[0]).transpose(1, 2)
        self.lora_b[slot] = scaled.to(self.lora_b.dtype)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, slots = self.batch.rows, self.batch.slots
        if rows is None or slots is None:
            return self.base(x)
        if self.fused_gpu is not None:
            return self._gpu(x)
        y = self.base(x)
        if self.kernel is not None:
            return self._fused(x, y)
        if self.batch.packing is not None:
            return self._packed(x, y)
        if self.batch.every_row:  # the common mixed-traffic case: accumulate in place, no gather/scatter
            shrunk = torch.bmm(x.reshape(len(rows), -1, x.shape[-1]), self._a(slots))  # [B, T, r]
            y.view(len(rows), -1, y.shape[-1]).baddbmm_(shrunk, self.lora_b[slots])  # y as [B, T, out], in place
            return y
        xs = x.index_select(0, rows).reshape(len(rows), -1, x.shape[-1])  # [n, T, in]; T=1 for BERT's pooler
        delta = torch.bmm(torch.bmm(xs, self._a(slots)), self.lora_b[slots])  # [n, T, out]
        return y.index_add_(0, rows, delta.reshape(len(rows), *y.shape[1:]).to(y.dtype))

    def _fused(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One kernel call adds every LoRA token's delta to y in place; x, y as [tokens, features]."""
        assert self.kernel is not None and x.dtype == y.dtype == torch.bfloat16 and y.is_contiguous()
        flat_x = x.reshape(-1, x.shape[-1]).contiguous()
        tokens, slots = self.batch.token_slots(len(flat_x) // len(x))
        self.kernel.lora_delta(flat_x, y.view(-1, y.shape[-1]), self.lora_a, self.lora_b, tokens, slots)
        return y

    def _gpu(self, x: torch.Tensor) -> torch.Tensor:
        """The base linear and the deltas in one Triton GEMM (engine.lora_triton); x as [tokens, in]."""
        assert self.fused_gpu is not None
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        tiles = self.batch.tiles(len(flat), len(flat) // len(x), self.lora_a.shape[0], self.fused_gpu.blocks.m)
        y = self.fused_gpu(flat, self.base.weight, self.base.bias, self.lora_a, self.lora_b, tiles)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _packed(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [T, in], y: [T, out] packed tokens; the deltas run on the chunk grid (rank-sized work only)."""
        chunks = self.batch.chunks()
        grid = self.batch.on_grid(x)  # [chunks, length, in]
        shrunk = torch.bmm(grid, self._a(chunks.slots))  # [chunks, length, r]
        delta = torch.bmm(shrunk, self.lora_b.index_select(0, chunks.slots)).view(-1, y.shape[-1])  # [grid, out]
        delta = delta.index_select(0, chunks.positions)  # [t, out]
        if chunks.every_token:
            y[: len(delta)].add_(delta)  # the bucket's filler rows (packed.token_bucket) get no delta
            return y
        return y.index_add_(0, chunks.tokens, delta)

    def _a(self, slots: torch.Tensor) -> torch.Tensor:
        """[n, in, r]: each entry's A, as a transposed view of the gathered [n, r, in]."""
        return self.lora_a.index_select(0, slots).transpose(1, 2)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for model code that reads `proj.weight.dtype` and the like."""
        return self.base.weight_int8 if isinstance(self.base, Int8Linear) else self.base.weight


class LoraLayers:
    """Owns the wrapped linears of one base model; wraps a module the first time an adapter targets it."""

    def __init__(
        self,
        model: nn.Module,
        n_slots: int,
        max_rank: int,
        kernel: CpuKernels | None = None,
        fused_gpu: TritonLoraLinear | None = None,
    ) -> None:
        self.model = model
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.kernel = kernel
        self.fused_gpu = fused_gpu
        self.batch = LoraBatch()
        self.layers: dict[str, BatchedLoraLinear] = {}

    @property
    def path(self) -> str:
        """For the startup line and benches: how LoRA deltas are computed."""
        if self.kernel is not None:
            return "fused CPU kernel"
        return "fused Triton GEMM" if self.fused_gpu is not None else "gathered bmm"

    def _wrap(self, name: str) -> BatchedLoraLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        if isinstance(base, BatchedLoraLinear):  # wrapped by an earlier engine on the same model
            base = base.base
        wrapped = BatchedLoraLinear(base, self.batch, self.n_slots, self.max_rank, self.kernel, self.fused_gpu)
        setattr(parent, child, wrapped)
        self.layers[name] = wrapped
        return wrapped

    def install(self, slot: int, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        self.clear(slot)
        for name, (a, b) in lora.items():
            layer = self.layers.get(name) or self._wrap(name)
            layer.set_slot(slot, a, b, scaling)

    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def bind(self, row_slots: list[int], device: torch.device) -> None:
        """Point every wrapped layer at this batch's rows; rows with slot -1 get no LoRA."""
        pairs = [(row, slot) for row, slot in enumerate(row_slots) if slot >= 0]
        self.batch.reset()
        if not pairs or not self.layers:
            self.batch.rows = self.batch.slots = None
            return
        self.batch.rows = torch.tensor([p[0] for p in pairs], device=device)
        self.batch.slots = torch.tensor([p[1] for p in pairs], device=device)
        self.batch.every_row = len(pairs) == len(row_slots)
