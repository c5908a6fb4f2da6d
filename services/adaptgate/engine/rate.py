"""How many rows the engine answers per second, measured on its recent batches.

Admission reads it to tell whether a request can still be answered before its deadline: work that
would expire in the queue, after part of it ran, only takes the engine from requests that can finish.
"""

from __future__ import annotations

from adaptgate.engine.batcher import BatchStats

# Each batch's weight in the estimate decays by this factor per later batch (about the last 20 count).
DECAY = 0.95


class RowRate:
    """Rows per second of forward time, over exponentially decayed sums (long batches weigh more)."""

    def __init__(self) -> None:
        self._rows = 0.0
        self._seconds = 0.0

    def observe(self, stats: BatchStats) -> None:
        self._rows = self._rows * DECAY + stats.rows
        self._seconds = self._seconds * DECAY + stats.seconds

    @property
    def rows_per_second(self) -> float | None:
        """None until a batch has been measured."""
        return self._rows / self._seconds if self._seconds > 0 else None
