"""One hot adapter merged into copies of the base weights: a batch whose every row uses that adapter runs
plain linears on `W + Bᵀ·A` and pays nothing for LoRA.

Why: when one adapter carries all of a batch (a tenant's dedicated traffic, a single-adapter deployment),
the per-token delta still costs a pass over the tokens in every targeted layer; merged weights cost
exactly what the base costs. Mixed batches (other adapters, or rows with none) keep the batch-wide
deltas, so merging never changes what any row gets, only how it is computed.

Only where the result is exact up to fp32 rounding: every targeted layer an `nn.Linear` with fp32
weights, A as [slots, r, in] and B as [slots, r, out] with the scaling folded in (every backend's
fp32 layout). Merging into bf16 or int8 weights would round most of a small delta away, so those engines never merge.

One adapter at a time (one more copy of the targeted linears' weights, allocated at the first merge and
reused). Which one follows the traffic: a slot is merged after `MERGE_AFTER` single-adapter batches in a
row, and a merged slot is replaced only once it has gone `KEEP_FOR` batches unused, so two adapters
taking turns never merge back and forth. A slot rewritten or cleared is unmerged at once.
Everything here runs on the engine's one thread, between forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from adaptgate.engine.lora.mapping import LoraMapping

if TYPE_CHECKING:
    from adaptgate.engine.lora.layers import BatchedLoraLinear

# Single-adapter batches of one slot in a row before it is merged: one stray batch does not cost a merge.
MERGE_AFTER = 4
# Batches the merged slot must go unused before another slot may take its place.
KEEP_FOR = 32


def can_merge(layers: dict[str, BatchedLoraLinear]) -> bool:
    """Merging is exact here: fp32 nn.Linear bases, B as [slots, r, out] (not bf16's interleaved rank pairs)."""
    return all(
        type(layer.base) is nn.Linear and layer.base.weight.dtype == torch.float32 and layer.lora_b.dim() == 3
        for layer in layers.values()
    )


@dataclass(frozen=True)
class MergeStats:
    """What operators see of merging (the adaptgate_adapters_merged gauge and its two counters)."""

    merged: int = 0  # adapters merged now: 0 or 1
    merges: int = 0  # times an adapter was merged, each a pass over the targeted weights
    batches: int = 0  # forward passes that ran on merged weights, computing no delta


class MergedAdapter:
    """The merged slot (None: none yet), its weights per layer, and the streak that picks the next one."""

    def __init__(self) -> None:
        self.slot: int | None = None
        self._weights: dict[str, torch.Tensor] = {}
        self._streak_slot, self._streak, self._idle = -1, 0, 0
        self._merges, self._batches = 0, 0

    @property
    def stats(self) -> MergeStats:
        """Plain ints, so a scrape on another thread reads them without a lock."""
        return MergeStats(int(self.slot is not None), self._merges, self._batches)

    def route(self, mapping: LoraMapping | None, layers: dict[str, BatchedLoraLinear]) -> bool:
        """Whether this batch runs on the merged weights (merging its slot first, when the traffic says so)."""
        single = mapping.single_slot if mapping is not None and mapping.every_row else None
        if single is not None and single == self.slot:
            self._idle, self._batches = 0, self._batches + 1
            return True
        self._idle += 1
        self._streak = self._streak + 1 if single is not None and single == self._streak_slot else int(single is not None)
        self._streak_slot = -1 if single is None else single
        if single is None or self._streak < MERGE_AFTER or (self.slot is not None and self._idle < KEEP_FOR):
            return False
        if not can_merge(layers):
            return False
        self._merge(single, layers)
        self._batches += 1
        return True

    @torch.no_grad()
    def _merge(self, slot: int, layers: dict[str, BatchedLoraLinear]) -> None:
        for name, layer in layers.items():
            merged = self._weights.get(name)
            if merged is None or merged.shape != layer.base.weight.shape:
                merged = self._weights[name] = torch.empty_like(layer.base.weight)
            # [r, in]ᵀ·[r, out] is the delta of xᵀ as [in, out]; nn.Linear holds [out, in].
            torch.addmm(layer.base.weight, layer.lora_b[slot].t(), layer.lora_a[slot], out=merged)
        self.slot, self._idle, self._merges = slot, 0, self._merges + 1

    def weight(self, name: str) -> torch.Tensor | None:
        """The merged weight of layer `name`, or None where the merged adapter has none (a layer wrapped since)."""
        return self._weights.get(name) if self.slot is not None else None

    def forget(self, slot: int) -> None:
        """Slot `slot` was rewritten or cleared: its merged weights no longer hold its adapter."""
        if slot == self.slot:
            self.slot = None
        if slot == self._streak_slot:
            self._streak_slot, self._streak = -1, 0
