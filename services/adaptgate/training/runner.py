"""What the job manager needs from whatever executes training (Ray in production, fakes in tests)."""

from __future__ import annotations

from typing import Protocol

from adaptgate.training.head import HeadParams, HeadResult
from adaptgate.training.updates import Report


class TrainingFailed(RuntimeError):
    """Training could not finish; the message is the reason shown on the job (no stack trace)."""


class Runner(Protocol):
    async def run(
        self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: HeadParams, on_event: Report
    ) -> HeadResult:
        """Train and return the head. Calls `on_event(update)` on the event loop's thread for each
        update (see `updates.py`); raises TrainingFailed with a readable reason; cancelling the
        awaiting task must cancel the underlying work."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop the job's work if it is running; a no-op for unknown or finished jobs."""
        ...
