"""oneDNN-prepacked linears for the CPU bf16 forward: the serving engine's base weights, reordered once.

`F.linear` on a bf16 CPU tensor hands oneDNN a plain [out, in] weight, which it reorders into its
blocked layout on every call; a weight reordered once at load time (what inductor's freezing pass
does) skips that, with bit-identical results. The same call can apply GELU in the matmul's epilogue,
sparing the FFN one pass over its widest activation. Serving only: the packed weights take no
gradients, so training loads its own model. Whether this CPU runs oneDNN's bf16 matmuls natively is
engine.cpu_features' call (the same detector that picks the fused kernels).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from transformers.activations import GELUActivation

from adaptgate.engine import cpu_features

log = logging.getLogger(__name__)


def _ops() -> object:
    return torch.ops.mkldnn


class PrepackedLinear(nn.Module):
    """`x·Wᵀ + b` (then GELU when asked) with W held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = _ops()._reorder_linear_weight(linear.weight.detach())  # type: ignore[attr-defined]
        self.bias = linear.bias.detach() if linear.bias is not None else None

    @property
    def weight(self) -> torch.Tensor:
        """The packed weight, for model code that reads `dense.weight.dtype` (its dtype and device hold)."""
        return self.packed

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        """activation: "none" or "gelu" (the exact, erf-based GELU)."""
        algorithm = "none" if activation == "gelu" else ""
        return _ops()._linear_pointwise(x, self.packed, self.bias, activation, [], algorithm)  # type: ignore[attr-defined]


def is_exact_gelu(module: nn.Module) -> bool:
    """BERT's `hidden_act: gelu`: the erf form, which oneDNN's gelu epilogue computes too."""
    return type(module) is GELUActivation and module.act is nn.functional.gelu


@functools.cache
def can_prepack() -> bool:
    """Whether this torch has oneDNN and this CPU runs its bf16 matmuls natively (engine.cpu_features)."""
    return torch.backends.mkldnn.is_available() and cpu_features.onednn_bf16()


def prepack_linears(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Swap every nn.Linear of the encoder for a PrepackedLinear (CPU bf16 where can_prepack); returns how many.

    Leaves the model as it was elsewhere, and says why in the log: INFO for a CPU or torch without
    native bf16 oneDNN, WARNING when oneDNN was expected to prepack and failed.
    """
    if device.type != "cpu" or dtype != torch.bfloat16:
        return 0
    if not can_prepack():
        log.info("linears run unpacked: this CPU or torch has no native bf16 oneDNN (AVX512BW/VL/DQ or AVX-NE-CONVERT)")
        return 0
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and not name.startswith("pooler")]
    try:
        swaps = {name: PrepackedLinear(model.get_submodule(name)) for name in names}
    except (RuntimeError, AttributeError) as exc:  # a torch without these oneDNN ops
        log.warning("linears run unpacked: oneDNN could not prepack them (%s)", exc)
        return 0
    for name, packed in swaps.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    return len(swaps)
