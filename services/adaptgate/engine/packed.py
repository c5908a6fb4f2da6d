"""Padding-free forward for BERT-style encoders (the TEI idea, in plain PyTorch).

Short texts in one batch differ in length: padded to the longest, a 32-row batch of SST-2
sentences (13 tokens on average) spends about two thirds of its matmul work on pad tokens.
Here every linear layer — where ~80% of the FLOPs are — runs on the packed real tokens
`[T, H]` only; just attention, which needs the `[B, heads, L, d]` layout, sees a padded grid,
and that in up to four length groups (`attention_groups`). BatchForward packs a batch only when
it carries enough padding to pay for the gathers and scatters (`PACKING_MIN_WASTE`).
Rows stay contiguous in the packed layout (pads are on the right), so LoRA layers can cut each
row's tokens into equal chunks for their gathered matmuls (`lora.LoraChunks`).

On a CPU with engine.cpu_kernels, attention too runs on the packed tokens (`PackedBertEncoder`).

Only transformers' own `BertModel` (no decoder, no cross-attention) takes this path; every
other family runs through its transformers forward. Tests hold both paths to the same outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from adaptgate.engine.cpu_kernels import CpuKernels
from adaptgate.engine.prepacked import PrepackedLinear, is_exact_gelu


def token_bucket(tokens: int) -> int:
    """`tokens` rounded up to one of 16 sizes per power of two (at most 1/16 more, and a multiple of 8).

    The CPU's oneDNN matmuls compile a kernel for every new row count (about 1 ms each, a third of a
    short request's forward) and keep only 1,024; exact token counts would make nearly every batch new.
    """
    step = max(8, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // step) * step


@dataclass
class Packing:
    """Where the real tokens of a right-padded `[rows, width]` batch sit: `index` holds their flat positions.

    Packed tensors carry `token_bucket(T)` rows: the real tokens, then copies of the last one, which
    row-wise layers compute and nothing reads back.
    """

    index: torch.Tensor  # [T] positions row * width + column, row-major
    rows: int
    width: int
    gather: torch.Tensor  # [bucket] index, then its last entry repeated
    # The last tensor unpacked and its grid: query, key and value read the same input.
    _last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Packing:
        rows, width = mask.shape
        index = mask.reshape(-1).nonzero().squeeze(1)
        extra = token_bucket(len(index)) - len(index)
        return cls(index, rows, width, torch.cat([index, index[-1:].expand(extra)]))

    @property
    def tokens(self) -> int:
        return len(self.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> [bucket, ...]: the real tokens (and the bucket's filler)."""
        return x.reshape(self.rows * self.width, *x.shape[2:]).index_select(0, self.gather)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[bucket, H] -> [rows, width, H], zeros at the pads."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        out = x.new_zeros(self.rows * self.width, x.shape[-1])
        out.index_copy_(0, self.index, x[: self.tokens])
        grid = out.view(self.rows, self.width, x.shape[-1])
        self._last = (x, grid)
        return grid


@dataclass(frozen=True)
class AttentionGroup:
    """Rows of similar length whose attention runs on their own `[rows, width]` grid."""

    tokens: torch.Tensor  # [t] the group's packed token indices, row by row
    positions: torch.Tensor  # [t] where those tokens sit in the group's grid
    rows: int
    width: int
    key_mask: torch.Tensor  # [rows, 1, 1, width]


MAX_ATTENTION_GROUPS = 4
GROUPING_MIN_GAIN = 0.7  # group only when it cuts attention work (rows x width^2) to below this share


def _split_cost(lengths: list[int], groups: int) -> int:
    """Attention work of `groups` equal-count groups of the sorted lengths: sum of rows x longest^2."""
    size = -(-len(lengths) // groups)
    return sum(len(part) * max(part) ** 2 for part in (lengths[i : i + size] for i in range(0, len(lengths), size)))


def attention_groups(mask: torch.Tensor) -> list[AttentionGroup] | None:
    """Length groups for attention, or None when one padded grid is about as cheap.

    Attention on the CPU costs far more than its FLOPs at short lengths, and a batch padded to its
    longest row pays rows x longest^2: rows sorted by length and cut into up to four groups of equal
    count pay only each group's own longest.
    """
    lengths = mask.sum(dim=1).tolist()
    ordered = sorted(lengths)
    costs = {k: _split_cost(ordered, k) for k in range(1, min(MAX_ATTENTION_GROUPS, len(lengths)) + 1)}
    floor = min(costs.values())
    best = min(k for k, cost in costs.items() if cost <= 1.15 * floor)  # fewer groups unless more pay clearly
    if best == 1 or costs[best] > GROUPING_MIN_GAIN * costs[1]:
        return None
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    size = -(-len(order) // best)
    return [_group(order[i : i + size], lengths, starts, mask) for i in range(0, len(order), size)]


def _group(rows: list[int], lengths: list[int], starts: list[int], mask: torch.Tensor) -> AttentionGroup:
    width = max(lengths[r] for r in rows)
    tokens = torch.cat([torch.arange(starts[r], starts[r] + lengths[r]) for r in rows])
    positions = torch.cat([torch.arange(lengths[r]) + i * width for i, r in enumerate(rows)])
    key_mask = mask[rows, :width].bool()[:, None, None, :]
    return AttentionGroup(tokens.to(mask.device), positions.to(mask.device), len(rows), width, key_mask)


def row_spans(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each row's first packed token and length ([rows] int64 on the CPU), and the longest: the kernel's rows."""
    lengths = mask.sum(dim=1).cpu().contiguous()
    return (torch.cumsum(lengths, 0) - lengths).contiguous(), lengths, int(lengths.max())


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
    """Runs a BertModel's own modules (and any LoRA wrappers inside them) on packed tokens.

    With `kernels` (a bf16 model on a CPU that built engine.cpu_kernels) attention runs within each
    row of the packed tokens directly, with no grid, no length groups and no copies.
    """

    def __init__(self, model: nn.Module, kernels: CpuKernels | None = None) -> None:
        self.model = model
        self.heads = int(model.config.num_attention_heads)
        even_heads = (int(model.config.hidden_size) // self.heads) % 2 == 0
        self.kernels = kernels if even_heads else None
        self.fuse_gelu = all(is_exact_gelu(layer.intermediate.intermediate_act_fn) for layer in model.encoder.layer)

    def _attention(self, layer: nn.Module, h: torch.Tensor, packing: Packing, key_mask: torch.Tensor) -> torch.Tensor:
        attn = layer.attention.self

        def grid(t: torch.Tensor) -> torch.Tensor:  # [T, H] -> [B, heads, L, d]
            return packing.unpack(t).view(packing.rows, packing.width, self.heads, -1).transpose(1, 2)

        context = F.scaled_dot_product_attention(grid(attn.query(h)), grid(attn.key(h)), grid(attn.value(h)), attn_mask=key_mask)
        return packing.pack(context.transpose(1, 2)).reshape(-1, h.shape[-1])

    def _grouped_attention(self, layer: nn.Module, h: torch.Tensor, groups: list[AttentionGroup]) -> torch.Tensor:
        attn = layer.attention.self
        q, k, v = attn.query(h), attn.key(h), attn.value(h)
        out = torch.zeros_like(q)  # the bucket's filler rows stay zero
        for g in groups:

            def grid(t: torch.Tensor, g: AttentionGroup = g) -> torch.Tensor:  # [T, H] -> [rows, heads, width, d]
                flat = t.new_zeros(g.rows * g.width, t.shape[-1]).index_copy_(0, g.positions, t.index_select(0, g.tokens))
                return flat.view(g.rows, g.width, self.heads, -1).transpose(1, 2)

            context = F.scaled_dot_product_attention(grid(q), grid(k), grid(v), attn_mask=g.key_mask)
            flat = context.transpose(1, 2).reshape(g.rows * g.width, -1)
            out.index_copy_(0, g.tokens, flat.index_select(0, g.positions))
        return out

    def _kernel_attention(self, layer: nn.Module, h: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        attn = layer.attention.self
        assert self.kernels is not None
        return self.kernels.packed_attention(attn.query(h), attn.key(h), attn.value(h), rows, self.heads)

    def _embed(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """BertEmbeddings' sums, in its order, on the packed tokens only: no lookups or LayerNorm for the pads."""
        emb = self.model.embeddings
        columns = packing.gather % packing.width  # [bucket]
        positions = emb.position_ids[0, columns]
        types = emb.token_type_ids[0, columns] if hasattr(emb, "token_type_ids") else torch.zeros_like(columns)
        words = emb.word_embeddings(ids.reshape(-1).index_select(0, packing.gather))
        summed = words + emb.token_type_embeddings(types) + emb.position_embeddings(positions)
        return emb.dropout(emb.LayerNorm(summed))

    def _add_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        fused = self.kernels.add_layer_norm(x, residual, norm) if self.kernels is not None else None
        return fused if fused is not None else norm(x + residual)

    def _intermediate(self, intermediate: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """GELU in the matmul's epilogue when the linear is prepacked and carries no LoRA (which must precede it)."""
        if self.fuse_gelu and isinstance(intermediate.dense, PrepackedLinear):
            return intermediate.dense(x, activation="gelu")
        return intermediate.intermediate_act_fn(intermediate.dense(x))

    def _layer(
        self,
        layer: nn.Module,
        h: torch.Tensor,
        packing: Packing,
        key_mask: torch.Tensor,
        groups: list[AttentionGroup] | None,
        rows: tuple[torch.Tensor, torch.Tensor, int] | None,
    ) -> torch.Tensor:
        if rows is not None:
            context = self._kernel_attention(layer, h, rows)
        elif groups is None:
            context = self._attention(layer, h, packing, key_mask)
        else:
            context = self._grouped_attention(layer, h, groups)
        attended = self._add_norm(layer.attention.output.dense(context), h, layer.attention.output.LayerNorm)
        inner = self._intermediate(layer.intermediate, attended)
        return self._add_norm(layer.output.dense(inner), attended, layer.output.LayerNorm)

    def __call__(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        packing: Packing,
        before_pooler: Callable[[], None] | None = None,
        pooler: bool = True,
    ) -> EncoderOutput:
        """`before_pooler()` runs once the encoder layers are done (the engine unbinds packed LoRA there);
        `pooler=False` skips BERT's pooler when no row of the batch reads it (embeddings; heads on mean or CLS)."""
        key_mask = mask.bool()[:, None, None, :]  # [B, 1, 1, L]: every query attends to its row's real tokens
        h = self._embed(ids, packing)  # [T, H]
        rows = row_spans(mask) if self.kernels is not None and h.dtype == torch.bfloat16 else None
        groups = attention_groups(mask) if rows is None else None
        for layer in self.model.encoder.layer:
            h = self._layer(layer, h, packing, key_mask, groups, rows)
        hidden = packing.unpack(h)
        if before_pooler is not None:
            before_pooler()
        pooled = self.model.pooler(hidden) if pooler and self.model.pooler is not None else None
        return EncoderOutput(hidden, pooled)
