"""Length groups for attention on a padded grid: the packed path's attention where the CPU kernels do not run."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
