"""A forward's row-to-slot mapping: built once per batch, before any LoRA layer runs, and handed to the backend."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaptgate.engine.packed import Packing


@dataclass(frozen=True)
class LoraMapping:
    """Rows of the current batch that carry an adapter, the slot of each, and the packed layout if the encoder packs.

    A packed batch's encoder layers see packed tokens `[bucket, in]`; its pooler then sees one vector per
    row `[rows, in]`. `is_packed` tells them apart by shape: they share a shape only when every row is a
    single token and the bucket has no filler, where packed token i is row i and both mappings agree.
    """

    rows: torch.Tensor  # [n] batch rows that carry an adapter, on the model's device
    slots: torch.Tensor  # [n] engine slot of each such row
    batch_rows: int
    every_row: bool  # every row carries an adapter: deltas go in place, with no row gather or scatter
    packing: Packing | None = None  # the packed-batch object when the encoder runs on packed tokens
    single_slot: int | None = None  # the one slot every adapter row uses, when they all use the same

    @classmethod
    def build(cls, row_slots: list[int], device: torch.device, packing: Packing | None = None) -> LoraMapping | None:
        """None when no row has an adapter (slot -1 on every row): the layers then run their base alone."""
        pairs = [(row, slot) for row, slot in enumerate(row_slots) if slot >= 0]
        if not pairs:
            return None
        rows = torch.tensor([p[0] for p in pairs], device=device)
        slots = torch.tensor([p[1] for p in pairs], device=device)
        distinct = {p[1] for p in pairs}
        single = distinct.pop() if len(distinct) == 1 else None
        return cls(rows, slots, len(row_slots), len(pairs) == len(row_slots), packing, single)

    def is_packed(self, x: torch.Tensor) -> bool:
        """Whether x holds this batch's packed tokens rather than its rows."""
        return self.packing is not None and x.dim() == 2 and x.shape[0] == self.packing.bucket
