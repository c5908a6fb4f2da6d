"""The LoRA backend seam (vLLM's PunicaWrapper idea): one object per engine decides how deltas are computed.

A backend owns three things: its weight layout (how a slot's A and B are stored, `buffers` and
`slot_weights`), a per-forward step that turns the batch's mapping into whatever its kernel indexes
by (`prepare`, once per forward), and the per-layer op (`linear`: the base output plus every mapped
row's delta). Layers hold the backend and their own buffers; they do not know which backend runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from adaptgate.engine.lora.mapping import LoraMapping

if TYPE_CHECKING:
    from adaptgate.engine.lora.layers import BatchedLoraLinear


class LoraBackend(ABC):
    """Default layout: A as [slots, r, in] (PEFT's own), B as [slots, r, out] with the adapter's scaling folded in."""

    name: ClassVar[str]
    layout: str = "a [slots, r, in], b [slots, r, out]"
    kernel: str = "pytorch"  # the adaptgate_engine_kernel_info path of lora_delta (engine.cpu_kernels' names)

    def __init__(self) -> None:
        self.mapping: LoraMapping | None = None

    def rank(self, max_rank: int) -> int:
        """The rank slots are padded to (a zero rank adds nothing)."""
        return max_rank

    def buffers(
        self, n_slots: int, max_rank: int, fan_in: int, fan_out: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed A and B for every slot of one layer, in this backend's layout."""
        rank = self.rank(max_rank)
        a = torch.zeros(n_slots, rank, fan_in, dtype=dtype, device=device)
        return a, torch.zeros(n_slots, rank, fan_out, dtype=dtype, device=device)

    def slot_weights(self, a: torch.Tensor, b: torch.Tensor, scaling: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's A and B in this layout, from PEFT's a [r, in] and b [out, r], zero-padded up to `rank`."""
        padded_a = torch.zeros(rank, a.shape[1], dtype=a.dtype)
        padded_a[: a.shape[0]] = a
        scaled_b = torch.zeros(rank, b.shape[0])  # [r_max, out]
        scaled_b[: a.shape[0]] = b.t().float() * scaling
        return padded_a, self.lay_out_b(scaled_b)

    def lay_out_b(self, scaled_b: torch.Tensor) -> torch.Tensor:
        """[r, out] -> this backend's per-slot B."""
        return scaled_b

    def prepare(self, mapping: LoraMapping | None) -> None:
        """Once per forward, before any layer runs: the batch's mapping (None: no row has an adapter)."""
        self.mapping = mapping

    def linear(self, layer: BatchedLoraLinear, x: torch.Tensor) -> torch.Tensor:
        """`layer.base(x)` plus each mapped row's `(x·A_s)·B_s`."""
        y = layer.base(x)
        return y if self.mapping is None else self.add_delta(layer, x, y, self.mapping)

    @abstractmethod
    def add_delta(self, layer: BatchedLoraLinear, x: torch.Tensor, y: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
        """y plus every mapped row's delta (in place where it can), as [*x.shape[:-1], out]."""
