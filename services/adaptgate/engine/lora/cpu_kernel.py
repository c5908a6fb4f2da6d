"""The CPU-kernel backend: one fused kernel call per layer adds every LoRA token's delta (engine.cpu_kernels).

The AVX512-BF16 kernel for bf16 models, the AVX2 one for fp32 models. Its layout: ranks padded to a multiple
of 8 (`kernel_rank`); in bf16, B stored with rank pairs interleaved, [slots, r/2, out, 2], the order the
kernel's bf16 dot-product instructions read; in fp32, B as it is, [slots, r, out].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from adaptgate.engine.cpu_kernels import PYTORCH, CpuKernels, kernel_rank
from adaptgate.engine.lora.backend import LoraBackend
from adaptgate.engine.lora.mapping import LoraMapping

if TYPE_CHECKING:
    from adaptgate.engine.lora.layers import BatchedLoraLinear


class CpuKernel(LoraBackend):
    """x and y as [tokens, features]; the mapping as the kernel's (token, slot) index pairs, int64 on the CPU."""

    name = "fused CPU kernel"
    layout = "a [slots, r8, in], b [slots, r8/2, out, 2]"

    def __init__(self, kernels: CpuKernels, dtype: torch.dtype = torch.bfloat16) -> None:
        """dtype: the model's, which picks the kernel and the layout of B."""
        super().__init__()
        self.kernels = kernels
        self.kernel = kernels.lora_path(dtype, torch.device("cpu"), 8)
        if self.kernel == PYTORCH:
            raise ValueError(f"no fused LoRA kernel runs {dtype} on this CPU")
        self.interleaved = dtype == torch.bfloat16
        if not self.interleaved:
            self.layout = "a [slots, r8, in], b [slots, r8, out]"
        self._token_slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def rank(self, max_rank: int) -> int:
        return kernel_rank(max_rank)

    def buffers(
        self, n_slots: int, max_rank: int, fan_in: int, fan_out: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.interleaved:
            return super().buffers(n_slots, max_rank, fan_in, fan_out, dtype, device)
        rank = self.rank(max_rank)
        a = torch.zeros(n_slots, rank, fan_in, dtype=dtype, device=device)
        return a, torch.zeros(n_slots, rank // 2, fan_out, 2, dtype=dtype, device=device)

    def lay_out_b(self, scaled_b: torch.Tensor) -> torch.Tensor:
        """[r, out] -> [r/2, out, 2] in bf16: rank pairs interleaved."""
        return scaled_b.view(-1, 2, scaled_b.shape[1]).transpose(1, 2) if self.interleaved else scaled_b

    def prepare(self, mapping: LoraMapping | None) -> None:
        super().prepare(mapping)
        self._token_slots.clear()

    def add_delta(self, layer: BatchedLoraLinear, x: torch.Tensor, y: torch.Tensor, mapping: LoraMapping) -> torch.Tensor:
        """One kernel call adds every LoRA token's delta to y in place (the op checks dtypes, shapes and indices).

        Packed tokens arrive as [tokens, features] already: no reshape, since every torch call lets go of the
        GIL and may wait for the event loop to hand it back."""
        if x.dim() == 2 and x.is_contiguous():
            flat_x, flat_y, per_row = x, y, 1
        else:
            flat_x, flat_y = x.reshape(-1, x.shape[-1]).contiguous(), y.view(-1, y.shape[-1])
            per_row = len(flat_x) // len(x)
        tokens, slots = self.token_slots(mapping, x, per_row)
        self.kernels.lora_delta(flat_x, flat_y, layer.lora_a, layer.lora_b, tokens, slots)
        return y

    def token_slots(self, mapping: LoraMapping, x: torch.Tensor, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows of x (as [tokens, in]) carry LoRA, and their slots ([n] each), built once per layout.

        Packed, x holds the packed tokens (and the bucket's filler, which gets none); padded, each batch
        row is `per_row` rows of x (its positions, pads included: they are computed anyway).
        """
        key = 0 if mapping.is_packed(x) else per_row
        if key not in self._token_slots:
            tokens, slots = _packed_token_slots(mapping) if key == 0 else _padded_token_slots(mapping, per_row)
            self._token_slots[key] = tokens.contiguous(), slots.contiguous()
        return self._token_slots[key]


def _packed_token_slots(mapping: LoraMapping) -> tuple[torch.Tensor, torch.Tensor]:
    packing = mapping.packing
    assert packing is not None
    row_slot = torch.full((packing.rows,), -1, dtype=torch.long)
    row_slot[mapping.rows.cpu()] = mapping.slots.cpu()
    token_slot = row_slot[torch.div(packing.index.cpu(), packing.width, rounding_mode="floor")]  # [T]
    tokens = torch.arange(len(token_slot)) if mapping.every_row else (token_slot >= 0).nonzero().squeeze(1)
    return tokens, token_slot[tokens]


def _padded_token_slots(mapping: LoraMapping, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, slots = mapping.rows.cpu(), mapping.slots.cpu()
    tokens = (rows.unsqueeze(1) * per_row + torch.arange(per_row)).reshape(-1)
    return tokens, torch.repeat_interleave(slots, per_row)
