"""Which model families have a packed encoder: model class -> encoder, and the path a base model runs.

Lookup is by the model's exact class: a subclass may change its forward, and the packed encoder
re-drives the family's own modules in that forward's order. A family without an entry runs its own
transformers forward on padded batches; the engine says which at start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import BertModel, RobertaModel, XLMRobertaModel

from adaptgate.engine.cpu_kernels import CpuKernels
from adaptgate.engine.packed.batch import EncoderOutput, Packing
from adaptgate.engine.packed.bert import PackedBertEncoder
from adaptgate.engine.packed.roberta import PackedRobertaEncoder

log = logging.getLogger(__name__)


class PackedEncoder(Protocol):
    """One family's forward on packed tokens, with the outputs of its transformers forward."""

    kernels: CpuKernels | None  # the CPU kernels it runs attention with, if any

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, packing: Packing, pooler: bool = True) -> EncoderOutput: ...


class PackedFamily(Protocol):
    """A registry entry: builds the encoder for a model, after saying whether that model's config fits it."""

    def __call__(self, model: nn.Module, kernels: CpuKernels | None = None) -> PackedEncoder: ...

    def unsupported(self, model: nn.Module) -> str | None: ...


PACKED_ENCODERS: dict[type[nn.Module], PackedFamily] = {
    BertModel: PackedBertEncoder,
    RobertaModel: PackedRobertaEncoder,
    XLMRobertaModel: PackedRobertaEncoder,
}


@dataclass(frozen=True)
class EncoderPath:
    """The forward a base model runs: a packed encoder, or None for its padded transformers forward."""

    encoder: PackedEncoder | None
    description: str  # for the log and the startup line


def _unsupported(model: nn.Module) -> str | None:
    family = PACKED_ENCODERS.get(type(model))
    if family is None:
        return f"no packed encoder is registered for {type(model).__name__}"
    return family.unsupported(model)


def supports_packing(model: nn.Module) -> bool:
    """True where a registered packed encoder gives this model's own outputs."""
    return _unsupported(model) is None


def encoder_path(model: nn.Module, kernels: CpuKernels | None, padding_free: bool = True) -> EncoderPath:
    """The packed encoder for this model when its family has one and padding-free batches are on; logged once."""
    name = type(model).__name__
    reason = _unsupported(model) if padding_free else "padding-free batches are off"
    if reason is not None:
        log.info("%s runs its transformers forward on padded batches: %s", name, reason)
        return EncoderPath(None, f"padded {name} forward ({reason})")
    family = PACKED_ENCODERS[type(model)]
    log.info("%s runs padding-free on packed tokens", name)
    return EncoderPath(family(model, kernels), f"padding-free {name} encoder")
