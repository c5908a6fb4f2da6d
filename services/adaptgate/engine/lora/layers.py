"""The wrapped linears: each keeps every engine slot's adapter weights, in the layout its backend chose.

A batch carries one slot per row (`LoraMapping`); the frozen `x·W` runs once for the whole batch and
only rows that have an adapter pay for their delta. No per-adapter loop, no merge.

Targets are `nn.Linear` (weight [out, in]) or GPT-2's `transformers.pytorch_utils.Conv1D`
(weight [in, out]; PEFT sets fan_in_fan_out=True for it). PEFT still saves A as [r, in] and
B as [out, r] for both, and fan_in_fan_out only matters when merging, so the delta is the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from adaptgate.engine.cpu_kernels import CpuKernels
from adaptgate.engine.int8 import Int8Linear
from adaptgate.engine.lora.backend import LoraBackend
from adaptgate.engine.lora.cpu_kernel import CpuKernel
from adaptgate.engine.lora.mapping import LoraMapping
from adaptgate.engine.lora.merged import MergedAdapter, MergeStats
from adaptgate.engine.lora.reference import GatheredBmm
from adaptgate.engine.packed import Packing
from adaptgate.engine.prepacked import PrepackedLinear

if TYPE_CHECKING:  # imports Triton, which only the GPU backend needs
    from adaptgate.engine.lora.triton_gemm import TritonLoraLinear


def linear_in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a LoRA-targetable module (the types PEFT's `all-linear` picks), None for anything else.

    Conv1D stores its weight transposed ([in, out], `nx`/`nf`), so nn.Linear's attributes do not exist there.
    """
    if isinstance(module, (nn.Linear, Int8Linear, PrepackedLinear)):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def compute_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype a targetable module computes in (an Int8Linear's activations, not its int8 weight) and its device."""
    reference = module.bias if isinstance(module, Int8Linear) else module.weight
    return getattr(module, "compute_dtype", reference.dtype), reference.device


class BatchedLoraLinear(nn.Module):
    """`y = base(x)` for all rows, plus `(x·A_s)·B_s` for each row's slot s, by the engine's backend.

    `base` is an nn.Linear (`x·Wᵀ + b`) or a Conv1D (`x·W + b`); only its (in, out) matter here.
    """

    def __init__(self, base: nn.Module, backend: LoraBackend, n_slots: int, max_rank: int) -> None:
        super().__init__()
        shape = linear_in_out(base)
        if shape is None:
            raise TypeError(f"LoRA can wrap nn.Linear or Conv1D, not {type(base).__name__}")
        self.base = base
        self.backend = backend
        dtype, device = compute_dtype_device(base)
        lora_a, lora_b = backend.buffers(n_slots, max_rank, *shape, dtype, device)
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)
        self.merged: torch.Tensor | None = None  # this forward's merged weight [out, in] (lora.merged), if any

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """a: [r, in] and b: [out, r] as PEFT stores them; the backend pads them to r_max and lays them out."""
        padded_a, laid_out_b = self.backend.slot_weights(a, b, scaling, self.lora_a.shape[1])
        self.lora_a[slot] = padded_a.to(self.lora_a.dtype)
        self.lora_b[slot] = laid_out_b.to(self.lora_b.dtype)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None:
            return F.linear(x, self.merged, self.base.bias)
        return self.backend.linear(self, x)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight, for model code that reads `proj.weight.dtype` and the like."""
        return self.base.weight_int8 if isinstance(self.base, Int8Linear) else self.base.weight


def select_backend(
    model: nn.Module, max_rank: int, kernels: CpuKernels | None = None, fused_gpu: TritonLoraLinear | None = None
) -> LoraBackend:
    """The one backend for this model's LoRA layers: the CPU kernel where every targetable linear suits it,
    else the Triton GEMM (asked for, and every target a plain half-precision nn.Linear, whose [out, in]
    weight it reads), else the gathered bmm."""
    targets = [m for m in model.modules() if linear_in_out(m) is not None]  # a wrapped linear's base is a submodule
    kinds = [compute_dtype_device(m) for m in targets]
    dtypes = {dtype for dtype, _ in kinds}
    if kernels is not None and len(dtypes) == 1 and all(kernels.supports_lora(dtype, device, max_rank) for dtype, device in kinds):
        return CpuKernel(kernels, dtypes.pop())
    half = (torch.bfloat16, torch.float16)
    if fused_gpu is not None and targets and all(type(m) is nn.Linear and m.weight.dtype in half for m in targets):
        from adaptgate.engine.lora.triton_gemm import TritonGemm

        return TritonGemm(fused_gpu)
    return GatheredBmm()


class LoraLayers:
    """Owns the wrapped linears of one base model and its one backend; wraps a module the first time an adapter targets it."""

    def __init__(
        self,
        model: nn.Module,
        n_slots: int,
        max_rank: int,
        kernel: CpuKernels | None = None,
        fused_gpu: TritonLoraLinear | None = None,
        backend: LoraBackend | None = None,
        merge: bool = True,
    ) -> None:
        """`kernel` and `fused_gpu` are what this engine could run: `select_backend` picks one, once, unless
        `backend` names it. `merge`: single-adapter batches may run on that adapter's merged weights (lora.merged)."""
        self.model = model
        self.n_slots = n_slots
        self.max_rank = max_rank
        self.kernel = kernel
        self.backend = backend or select_backend(model, max_rank, kernel, fused_gpu)
        self.layers: dict[str, BatchedLoraLinear] = {}
        self._merged = MergedAdapter() if merge else None
        self._routed = False  # whether the layers hold merged weights now

    @property
    def merged_slot(self) -> int | None:
        """The slot whose adapter is merged into copies of the base weights, if any."""
        return None if self._merged is None else self._merged.slot

    @property
    def merge_stats(self) -> MergeStats:
        return MergeStats() if self._merged is None else self._merged.stats

    @property
    def path(self) -> str:
        """For the startup line and benches: how LoRA deltas are computed."""
        return self.backend.name

    def use(self, backend: LoraBackend) -> None:
        """Switch every layer to another backend of the same weight layout (the bench's A/B between forwards)."""
        if backend.layout != self.backend.layout or backend.rank(self.max_rank) != self.backend.rank(self.max_rank):
            raise ValueError(f"{backend.name} stores adapters as {backend.layout}, not {self.backend.layout}")
        backend.prepare(None)
        self.backend = backend
        for layer in self.layers.values():
            layer.backend = backend

    def _wrap(self, name: str) -> BatchedLoraLinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        base = getattr(parent, child)
        if isinstance(base, BatchedLoraLinear):  # wrapped by an earlier engine on the same model
            base = base.base
        wrapped = BatchedLoraLinear(base, self.backend, self.n_slots, self.max_rank)
        setattr(parent, child, wrapped)
        self.layers[name] = wrapped
        return wrapped

    def install(self, slot: int, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        self.clear(slot)
        for name, (a, b) in lora.items():
            layer = self.layers.get(name) or self._wrap(name)
            layer.set_slot(slot, a, b, scaling)

    def clear(self, slot: int) -> None:
        if self._merged is not None:
            self._merged.forget(slot)
        for layer in self.layers.values():
            layer.clear_slot(slot)

    def prepare(self, row_slots: list[int], device: torch.device, packing: Packing | None = None) -> LoraMapping | None:
        """Once per forward: this batch's rows and slots (-1: no LoRA), and its packed layout when the encoder
        packs, handed to the backend before any layer runs; for a batch that runs on the merged adapter's
        weights (lora.merged), those weights go to the layers instead and no mapping to the backend.
        `prepare([], ...)` after the forward drops them."""
        mapping = LoraMapping.build(row_slots, device, packing) if self.layers else None
        routed = self._merged is not None and bool(row_slots) and self._merged.route(mapping, self.layers)
        if routed or self._routed:  # base and delta batches leave every layer's merged weight None
            merged = self._merged if routed else None
            for name, layer in self.layers.items():
                layer.merged = None if merged is None else merged.weight(name)
            self._routed = routed
        self.backend.prepare(None if routed else mapping)
        return mapping
