"""The packed-batch object: where each row's real tokens sit once a right-padded batch drops its pads."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def token_bucket(tokens: int) -> int:
    """`tokens` rounded up to one of 16 sizes per power of two (at most 1/16 more, and a multiple of 8).

    The CPU's oneDNN matmuls compile a kernel for every new row count and keep only 1,024; exact token
    counts would make nearly every batch a new shape, and compiling one costs a large share of a short
    request's forward.
    """
    step = max(8, 1 << max(0, tokens.bit_length() - 5))
    return -(-tokens // step) * step


@dataclass
class Packing:
    """A right-padded `[rows, width]` batch as packed tokens: `index` holds the real tokens' flat positions,
    `starts` and `lengths` each row's first packed token and count, so rows stay contiguous.

    Packed tensors carry `token_bucket(T)` rows: the real tokens, then copies of the last one, which
    row-wise layers compute and nothing reads back. Built once per forward; the packed encoder and the
    LoRA backend's prepare step both read it.
    """

    index: torch.Tensor  # [T] positions row * width + column, row-major
    rows: int
    width: int
    gather: torch.Tensor  # [bucket] index, then its last entry repeated
    starts: torch.Tensor  # [rows] int64 on the CPU: each row's first packed token
    lengths: torch.Tensor  # [rows] int64 on the CPU: each row's real tokens
    longest: int
    # The last tensor unpacked and its grid: query, key and value read the same input.
    _last: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Packing:
        rows, width = mask.shape
        index = mask.reshape(-1).nonzero().squeeze(1)
        extra = token_bucket(len(index)) - len(index)
        lengths = mask.sum(dim=1).cpu().contiguous()
        starts = (torch.cumsum(lengths, 0) - lengths).contiguous()
        gather = torch.cat([index, index[-1:].expand(extra)])
        return cls(index, rows, width, gather, starts, lengths, int(lengths.max()))

    @property
    def tokens(self) -> int:
        return len(self.index)

    @property
    def bucket(self) -> int:
        """Rows of a packed tensor: the real tokens and the bucket's filler."""
        return len(self.gather)

    @property
    def spans(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(starts, lengths, longest): the rows as the CPU kernels' packed attention takes them."""
        return self.starts, self.lengths, self.longest

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


def row_spans(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each row's first packed token and length ([rows] int64 on the CPU), and the longest: the kernel's rows."""
    lengths = mask.sum(dim=1).cpu().contiguous()
    return (torch.cumsum(lengths, 0) - lengths).contiguous(), lengths, int(lengths.max())


@dataclass
class EncoderOutput:
    """The two fields the engine reads from a transformers output; pads of `last_hidden_state` are zero."""

    last_hidden_state: torch.Tensor  # [B, L, H]
    pooler_output: torch.Tensor | None  # [B, H]
