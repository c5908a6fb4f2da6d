"""BERT's packed encoder: a BertModel's own modules (and any LoRA wrappers inside them) on packed tokens."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from adaptgate.engine.cpu_kernels import CpuKernels
from adaptgate.engine.packed.attention import AttentionGroup, attention_groups
from adaptgate.engine.packed.batch import EncoderOutput, Packing
from adaptgate.engine.prepacked import PrepackedLinear, is_exact_gelu


class PackedBertEncoder:
    """Runs a BertModel's embeddings, layers and pooler on packed tokens, in BertModel's order of operations.

    With `kernels` (a bf16 model on a CPU that built engine.cpu_kernels) attention runs within each
    row of the packed tokens directly, with no grid, no length groups and no copies.
    """

    def __init__(self, model: nn.Module, kernels: CpuKernels | None = None) -> None:
        self.model = model
        self.heads = int(model.config.num_attention_heads)
        even_heads = (int(model.config.hidden_size) // self.heads) % 2 == 0
        self.kernels = kernels if even_heads else None
        self.fuse_gelu = all(is_exact_gelu(layer.intermediate.intermediate_act_fn) for layer in model.encoder.layer)

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why this model's config needs its own transformers forward, or None when the packed one matches it."""
        config = getattr(model, "config", None)
        if config is None:
            return "the model has no config"
        if config.is_decoder or config.add_cross_attention:
            return "it is configured as a decoder"
        if getattr(config, "chunk_size_feed_forward", 0):
            return "its feed-forward runs in chunks"
        kind = getattr(config, "position_embedding_type", "absolute")
        return None if kind == "absolute" else f"its position embeddings are {kind!r}"

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

    def _positions(self, columns: torch.Tensor) -> torch.Tensor:
        """Each packed token's position id: its column in the padded batch (BERT counts from 0)."""
        return self.model.embeddings.position_ids[0, columns]

    def _embed(self, ids: torch.Tensor, packing: Packing) -> torch.Tensor:
        """The embeddings' sums, in BertEmbeddings' order, on the packed tokens only: no lookups or LayerNorm for the pads."""
        emb = self.model.embeddings
        columns = packing.gather % packing.width  # [bucket]
        types = emb.token_type_ids[0, columns] if hasattr(emb, "token_type_ids") else torch.zeros_like(columns)
        words = emb.word_embeddings(ids.reshape(-1).index_select(0, packing.gather))
        summed = words + emb.token_type_embeddings(types) + emb.position_embeddings(self._positions(columns))
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

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, packing: Packing, pooler: bool = True) -> EncoderOutput:
        """`packing` is this batch's packed layout (Packing.from_mask(mask)), the one the LoRA backend was
        prepared with; `pooler=False` skips the pooler when no row of the batch reads it (embeddings; heads
        on mean or CLS). The pooler sees one vector per row, which LoRA layers tell from packed tokens by shape."""
        key_mask = mask.bool()[:, None, None, :]  # [B, 1, 1, L]: every query attends to its row's real tokens
        h = self._embed(ids, packing)  # [T, H]
        rows = packing.spans if self.kernels is not None and h.dtype == torch.bfloat16 else None
        groups = attention_groups(mask) if rows is None else None
        for layer in self.model.encoder.layer:
            h = self._layer(layer, h, packing, key_mask, groups, rows)
        hidden = packing.unpack(h)
        pooled = self.model.pooler(hidden) if pooler and self.model.pooler is not None else None
        return EncoderOutput(hidden, pooled)
