"""A job's progress on the terminal, or in a log when the output is not one.

On a terminal one status line is redrawn in place. Anywhere else (a CI log, `kubectl logs`, a
file) redrawing would leave hundreds of carriage-return fragments, so a full line is written when
the state changes, when an evaluation or log message arrives, and otherwise at most every
`every` seconds: state, progress, ETA and the latest metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from adaptgate_client.types import JobEvent, JobMetrics

LOG_EVERY_S = 5.0


class JobProgress:
    def __init__(self, stream: TextIO, tty: bool | None = None, every: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.every, self.clock = stream, every, clock
        self.tty = stream.isatty() if tty is None else tty
        self.metrics: JobMetrics | None = None
        self.last_line = float("-inf")
        self.drawn = False

    def update(self, event: JobEvent) -> None:
        if event.kind == "eval" or any((event.metrics.accuracy, event.metrics.loss)):
            self.metrics = event.metrics
        line = self._status(event)
        if self.tty:
            self._redraw(line, keep=event.kind in ("state", "eval") or event.state.terminal)
        elif event.kind != "progress" or event.state.terminal or self.clock() - self.last_line >= self.every:
            print(line, file=self.stream, flush=True)
            self.last_line = self.clock()

    def _redraw(self, line: str, keep: bool) -> None:
        print(f"\r\x1b[2K{line}", end="\n" if keep else "", file=self.stream, flush=True)
        self.drawn = not keep

    def close(self) -> None:
        if self.tty and self.drawn:
            print(file=self.stream, flush=True)

    def _status(self, event: JobEvent) -> str:
        parts = [f"[{event.state.name}]", f"{event.progress:4.0%}"]
        if event.eta_seconds > 0:
            parts.append(f"eta {event.eta_seconds:.0f}s")
        if self.metrics is not None:
            parts.append(f"acc={self.metrics.accuracy:.4f} f1={self.metrics.macro_f1:.4f} loss={self.metrics.loss:.4f}")
        return " ".join(parts + [event.message]).rstrip()
