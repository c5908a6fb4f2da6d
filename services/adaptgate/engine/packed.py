"""Padding-free forward for BERT-style encoders (the TEI idea, in plain PyTorch).

Short texts in one batch differ in length: padded to the longest, a 32-row batch of SST-2
sentences (13 tokens on average) spends about two thirds of its matmul work on pad tokens.
Here every linear layer — where ~80% of the FLOPs are — runs on the packed real tokens
`[T, H]` only; just attention, which needs the `[B, heads, L, d]` layout, sees the padded grid.
Rows stay contiguous in the packed layout (pads are on the right), so LoRA layers can put
a row's tokens back on the grid for their per-row gathered matmuls (`Packing.unpack`).

Only transformers' own `BertModel` (no decoder, no cross-attention) takes this path; every
other family runs through its transformers forward. Tests hold both paths to the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class Packing:
    """Where the real tokens of a right-padded `[rows, width]` batch sit: `index` holds their flat positions."""

    index: torch.Tensor  # [T] positions row * width + column, row-major
    rows: int
    width: int
    # The last tensor unpacked and its grid: query, key and value LoRA layers read the same input.
    _last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Packing:
        rows, width = mask.shape
        return cls(mask.reshape(-1).nonzero().squeeze(1), rows, width)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [T, ...]: the real tokens only."""
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [rows, width, H], zeros at the pads."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        out = x.new_zeros(self.rows * self.width, x.shape[-1])
        out.index_copy_(0, self.index, x)
        grid = out.view(self.rows, self.width, x.shape[-1])
        self._last = (x, grid)
        return grid


@dataclass
class EncoderOutput:
    """The two fields the engine reads from a transformers output; pads of `last_hidden_state` are zero."""

    last_hidden_state: torch.Tensor  # [B, L, H]
    pooler_output: torch.Tensor | None  # [B, H]


def supports_packing(model: nn.Module) -> bool:
    """True for transformers' BertModel used as an encoder (MiniLM, BERT, BGE, E5 and the like)."""
    from transformers import BertModel

    config = getattr(model, "config", None)
    return (
        type(model) is BertModel
        and config is not None
        and not config.is_decoder
        and not config.add_cross_attention
        and not getattr(config, "chunk_size_feed_forward", 0)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
    )


class PackedBertEncoder:
    """Runs a BertModel's own modules (and any LoRA wrappers inside them) on packed tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.heads = int(model.config.num_attention_heads)

    def _attention(self, layer: nn.Module, h: torch.Tensor, packing: Packing, key_mask: torch.Tensor) -> torch.Tensor:
        attn = layer.attention.self

        def grid(t: torch.Tensor) -> torch.Tensor:  # [T, H] -> [B, heads, L, d]
            return packing.unpack(t).view(packing.rows, packing.width, self.heads, -1).transpose(1, 2)

        context = F.scaled_dot_product_attention(grid(attn.query(h)), grid(attn.key(h)), grid(attn.value(h)), attn_mask=key_mask)
        return packing.pack(context.transpose(1, 2)).reshape(-1, h.shape[-1])

    def _layer(self, layer: nn.Module, h: torch.Tensor, packing: Packing, key_mask: torch.Tensor) -> torch.Tensor:
        context = self._attention(layer, h, packing, key_mask)
        attended = layer.attention.output.LayerNorm(layer.attention.output.dense(context) + h)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(attended))
        return layer.output.LayerNorm(layer.output.dense(inner) + attended)

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, packing: Packing, before_pooler: Callable[[], None] | None = None
    ) -> EncoderOutput:
        """`before_pooler()` runs once the encoder layers are done (the engine unbinds packed LoRA there)."""
        key_mask = mask.bool()[:, None, None, :]  # [B, 1, 1, L]: every query attends to its row's real tokens
        h = packing.pack(self.model.embeddings(input_ids=ids))  # [T, H]
        for layer in self.model.encoder.layer:
            h = self._layer(layer, h, packing, key_mask)
        hidden = packing.unpack(h)
        if before_pooler is not None:
            before_pooler()
        pooler = self.model.pooler(hidden) if self.model.pooler is not None else None
        return EncoderOutput(hidden, pooler)
