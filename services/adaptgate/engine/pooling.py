"""Token states to one vector per row. Shapes: hidden [B, T, H], mask [B, T] -> [B, H].

Every mode reads the padded grid: the packed (padding-free) encoder unpacks its tokens to that grid,
pads zeroed, before pooling (engine.packed), so one table serves both paths. The modes are those
sentence-transformers' Pooling module offers, computed as it computes them (engine.st_config maps
its names here), accumulated in fp32.
"""

from __future__ import annotations

import enum

import torch


class Pooling(enum.Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST_TOKEN = "last_token"
    WEIGHTED_MEAN = "weighted_mean"
    MAX = "max"
    MEAN_SQRT_LEN = "mean_sqrt_len"


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average over real tokens, accumulated in fp32 so bf16 rounding does not pile up.

    One batched matmul, [B, 1, T] x [B, T, H], rather than multiplying by the mask and summing over T:
    on the CPU that sum is a strided reduction, many times slower (docs/performance.md).
    """
    weights = mask.to(torch.float32)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.bmm(weights.unsqueeze(1), hidden.to(torch.float32)).squeeze(1)


def weighted_mean_pool(hidden: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Mean with the i-th real token weighted i (1-based), as SGPT-style decoders were trained.

    The running count of real tokens gives those weights for right and left padding alike. `kept` (mask
    with a prompt's tokens off) chooses which tokens count; they keep the weights of their positions
    in the whole text, as sentence-transformers weighs them with include_prompt off.
    """
    real = mask.to(torch.float32)
    weights = real.cumsum(dim=1) * (real if kept is None else kept.to(torch.float32))  # [B, T]
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    return torch.bmm(weights.unsqueeze(1), hidden.to(torch.float32)).squeeze(1)


def mean_sqrt_len_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens divided by the square root of their count (sentence-transformers' mean_sqrt_len_tokens)."""
    real = mask.to(torch.float32)
    weights = real / real.sum(dim=1, keepdim=True).clamp(min=1e-9).sqrt()
    return torch.bmm(weights.unsqueeze(1), hidden.to(torch.float32)).squeeze(1)


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per feature the largest value over real tokens; pads (zero in the packed path's grid) never count."""
    pads = (mask == 0).unsqueeze(-1)  # [B, T, 1]
    return hidden.to(torch.float32).masked_fill(pads, float("-inf")).amax(dim=1)


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0].to(torch.float32)


def first_kept_pool(hidden: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """CLS pooling with a prompt left out: the first token after it (row 0's position when none is kept),
    where sentence-transformers' Pooling takes the first position its prompt-less mask keeps."""
    first = (kept != 0).to(torch.int32).argmax(dim=1)  # [B]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, first].to(torch.float32)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rightmost real token of each row, as `*ForSequenceClassification` of decoders picks it.

    Taking the argmax of position·mask (transformers' own trick) works for right padding, which the
    engine uses, and for left padding too, where `mask.sum() - 1` would land on a pad. transformers
    builds its mask from `input_ids != pad_token_id` rather than the attention mask; the two agree
    unless a text itself ends with the pad token (e.g. pad = eos and a tokenizer that appends eos).
    """
    positions = torch.arange(mask.shape[1], device=mask.device)  # [T]
    last = (positions * (mask != 0)).argmax(dim=1)  # [B]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last].to(torch.float32)


def without_pad_tokens(mask: torch.Tensor, input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """mask [B, T] with real tokens that equal the pad id switched off, for a decoder head's input.

    transformers' `*ForSequenceClassification` picks the rightmost token != config.pad_token_id,
    so where pad = eos and the tokenizer appends eos, it reads the token BEFORE that eos. Feeding
    this mask to `last_token_pool` reproduces that choice exactly (all-pad rows: position 0, as there).
    """
    return mask * (input_ids != pad_id).to(mask.dtype)


_POOLERS = {
    Pooling.MEAN: mean_pool,
    Pooling.CLS: cls_pool,
    Pooling.LAST_TOKEN: last_token_pool,
    Pooling.WEIGHTED_MEAN: weighted_mean_pool,
    Pooling.MAX: max_pool,
    Pooling.MEAN_SQRT_LEN: mean_sqrt_len_pool,
}


def without_leading(mask: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """mask [B, T] with each row's first skip[b] positions off: a prompt's tokens lead a right-padded row."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return mask * (positions.unsqueeze(0) >= skip.to(mask.device).unsqueeze(1)).to(mask.dtype)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling, skip: torch.Tensor | None = None) -> torch.Tensor:
    """`skip` [B]: leading tokens per row left out of the vector (a prompt under include_prompt=False);
    they still shaped every other token's state through attention."""
    if skip is None:
        return _POOLERS[mode](hidden, mask)
    kept = without_leading(mask, skip)
    if mode is Pooling.WEIGHTED_MEAN:
        return weighted_mean_pool(hidden, mask, kept)
    if mode is Pooling.CLS:
        return first_kept_pool(hidden, kept)
    return _POOLERS[mode](hidden, kept)


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
