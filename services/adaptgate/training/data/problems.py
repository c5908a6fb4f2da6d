"""Collects what is wrong with a dataset so one rejection names every problem and its lines.

A user fixing a file wants all reasons at once, each with the first few line numbers, rather
than one error per upload attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptgate.errors import InvalidDataset

MAX_LISTED = 5


def describe_lines(lines: list[int], limit: int = MAX_LISTED) -> str:
    """'line 3', 'lines 3, 9' or 'lines 3, 9, 12, 15, 20 and 4 more'."""
    if len(lines) == 1:
        return f"line {lines[0]}"
    shown = ", ".join(str(n) for n in lines[:limit])
    rest = len(lines) - limit
    return f"lines {shown}" + (f" and {rest} more" if rest > 0 else "")


@dataclass
class Problem:
    reason: str
    lines: list[int] = field(default_factory=list)
    detail: str = ""

    def describe(self) -> str:
        where = f" on {describe_lines(sorted(self.lines))}" if self.lines else ""
        return self.reason + where + (f" ({self.detail})" if self.detail else "")


@dataclass
class Problems:
    """Problems keyed by reason, in the order first seen; the first detail of a reason is kept."""

    items: dict[str, Problem] = field(default_factory=dict)

    def add(self, reason: str, line: int | None = None, detail: str = "") -> None:
        problem = self.items.setdefault(reason, Problem(reason, detail=detail))
        if line is not None:
            problem.lines.append(line)

    def raise_if_any(self) -> None:
        if self.items:
            text = "; ".join(p.describe() for p in self.items.values())
            raise InvalidDataset(f"dataset rejected: {text}")
