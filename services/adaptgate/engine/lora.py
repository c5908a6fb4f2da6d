"""Many LoRA adapters in one forward pass (the S-LoRA / Punica idea, vLLM's batch-wide mapping).

Every wrapped linear keeps stacked, rank-padded adapter weights for all engine slots:
A as [slots, in, r_max] and B as [slots, r_max, out] with the adapter's scaling folded into B.
A batch carries one slot per row (`LoraBatch`); the frozen `x·W` runs once for the whole batch
and only rows that have an adapter pay for the two gathered `bmm`s. No per-adapter loop, no merge.

Targets are `nn.Linear` (weight [out, in]) or GPT-2's `transformers.pytorch_utils.Conv1D`
(weight [in, out]; PEFT sets fan_in_fan_out=True for it). PEFT still saves A as [r, in] and
B as [out, r] for both, and fan_in_fan_out only matters when merging, so the delta is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptgate.engine.packed import Packing


def linear_in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a LoRA-targetable module (the types PEFT's `all-linear` picks), None for anything else.

    Conv1D stores its weight transposed ([in, out], `nx`/`nf`), so nn.Linear's attributes do not exist there.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


@dataclass
class LoraBatch:
    """Rows of the current batch that carry an adapter, and the slot of each. Set by the engine per forward."""

    rows: torch.Tensor | None = None  # [n] row indices into the batch
    slots: torch.Tensor | None = None  # [n] engine slot per such row
    every_row: bool = False  # n == batch size: no row gather/scatter needed
    packing: Packing | None = None  # set while inputs are packed tokens [T, in] (the padding-free encoder)


class BatchedLoraLinear(nn.Module):
    """`y = base(x)` for all rows, plus `(x·A_s)·B_s` for each row's slot s.

    `base` is an nn.Linear (`x·Wᵀ + b`) or a Conv1D (`x·W + b`); only its (in, out) matter here.
    """

    def __init__(self, base: nn.Module, batch: LoraBatch, n_slots: int, max_rank: int) -> None:
        super().__init__()
        shape = linear_in_out(base)
        if shape is None:
            raise TypeError(f"LoRA can wrap nn.Linear or Conv1D, not {type(base).__name__}")
        fan_in, fan_out = shape
        self.base = base
        self.batch = batch
        shape_a = (n_slots, fan_in, max_rank)  # [slots, in, r_max]
        shape_b = (n_slots, max_rank, fan_out)  # [slots, r_max, out]
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.register_buffer("lora_a", torch.zeros(shape_a, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(shape_b, **kw), persistent=False)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """a: [r, in] and b: [out, r] as PEFT stores them; zero-padded up to r_max."""
        rank = a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_a[slot, :, :rank] = a.t().to(self.lora_a.dtype)
        self.lora_b[slot, :rank, :] = (b.t().float() * scaling).to(self.lora_b.dtype)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows, slots = self.batch.rows, self.batch.slots
        if rows is None or slots is None:
            return y
        if self.batch.packing is not None:
            return self._packed(x, y, rows, slots, self.batch.packing)
        if self.batch.every_row:  # the common mixed-traffic case: accumulate in place, no gather/scatter
            shrunk = torch.bmm(x.reshape(len(rows), -1, x.shape[-1]), self.lora_a[slots])  # [B, T, r]
            y.view(len(rows), -1, y.shape[-1]).baddbmm_(shrunk, self.lora_b[slots])  # y as [B, T, out], in place
            return y
        xs = x.index_select(0, rows).reshape(len(rows), -1, x.shape[-1])  # [n, T, in]; T=1 for BERT's pooler
        delta = torch.bmm(torch.bmm(xs, self.lora_a[slots]), self.lora_b[slots])  # [n, T, out]
        return y.index_add_(0, rows, delta.reshape(len(rows), *y.shape[1:]).to(y.dtype))

    def _packed(self, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: [T, in], y: [T, out] packed tokens; each row's delta runs on the padded grid (rank-sized work only)."""
        grid = packing.unpack(x)  # [B, L, in]
        if not self.batch.every_row:
            grid = grid.index_select(0, rows)  # [n, L, in]
        delta = torch.bmm(torch.bmm(grid, self.lora_a[slots]), self.lora_b[slots])  # [n, L, out]
        if not self.batch.every_row:
            delta = delta.new_zeros(packing.rows, *delta.shape[1:]).index_copy_(0, rows, delta)
        return y.add_(packing.pack(delta))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for model code that reads `proj.weight.dtype` and the like."""
        return self.base.weight


class LoraLayers:
    """Owns the wrapped linears of one base model; wraps a module the first time an adapter targets it."""

    def __init__(self, model: nn.Module, n_slots: int, max_rank: int) -> None:
        self.model = model
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.batch = LoraBatch()
        self.layers: dict[str, BatchedLoraLinear] = {}

    def _wrap(self, name: str) -> BatchedLoraLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        if isinstance(base, BatchedLoraLinear):  # wrapped by an earlier engine on the same model
            base = base.base
        wrapped = BatchedLoraLinear(base, self.batch, self.n_slots, self.max_rank)
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
        if not pairs or not self.layers:
            self.batch.rows = self.batch.slots = None
            return
        self.batch.rows = torch.tensor([p[0] for p in pairs], device=device)
        self.batch.slots = torch.tensor([p[1] for p in pairs], device=device)
        self.batch.every_row = len(pairs) == len(row_slots)
