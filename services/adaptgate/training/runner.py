"""What the job manager needs from whatever executes training (Ray in production, fakes in tests)."""

from __future__ import annotations

from typing import Protocol

from adaptgate.training.methods import TrainParams, TrainResult
from adaptgate.training.updates import Report


class TrainingFailed(RuntimeError):
    """Training could not finish; the message is the reason shown on the job (no stack trace)."""


class Runner(Protocol):
    async def run(
        self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: TrainParams, on_event: Report
    ) -> TrainResult:
        """Train and return the result (HeadResult or LoraResult, by the params' type). Calls
        `on_event(update)` on the event loop's thread for each update (see `updates.py`); raises
        TrainingFailed with a readable reason; cancelling the awaiting task must cancel the
        underlying work. A job run again under the same id resumes from its checkpoint, if any."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop the job's work if it is running; a no-op for unknown or finished jobs."""
        ...

    def discard(self, job_id: str) -> None:
        """Forget the job's checkpoints: it reached a terminal state and will never resume."""
        ...
