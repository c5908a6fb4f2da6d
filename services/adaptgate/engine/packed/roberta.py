"""RoBERTa's and XLM-R's packed encoder: BERT's layers and pooler, with RoBERTa's position ids."""

from __future__ import annotations

import torch

from adaptgate.engine.packed.bert import PackedBertEncoder


class PackedRobertaEncoder(PackedBertEncoder):
    """RobertaEmbeddings numbers a row's real tokens from `padding_idx + 1` (pads keep `padding_idx`);
    rows are right-padded, so a packed token's position is its column plus that offset."""

    def _positions(self, columns: torch.Tensor) -> torch.Tensor:
        return columns + (self.model.embeddings.padding_idx + 1)
