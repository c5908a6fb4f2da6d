"""Token states to one vector per row. Shapes: hidden [B, T, H], mask [B, T] -> [B, H]."""

from __future__ import annotations

import enum

import torch


class Pooling(enum.Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST_TOKEN = "last_token"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over real tokens, accumulated in fp32 so bf16 rounding does not pile up."""
    weights = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * weights).sum(dim=1)
    return summed / weights.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0].to(torch.float32)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token of each row; works for right padding (what the engine uses)."""
    last = mask.sum(dim=1).long() - 1
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last].to(torch.float32)


_POOLERS = {Pooling.MEAN: mean_pool, Pooling.CLS: cls_pool, Pooling.LAST_TOKEN: last_token_pool}


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    return _POOLERS[mode](hidden, mask)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
