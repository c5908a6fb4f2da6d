"""What the job manager needs from whatever executes training (Ray in production, fakes in tests)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Protocol

from adaptgate.training.methods.method import TrainParams, TrainResult
from adaptgate.training.runners.updates import Update

log = logging.getLogger(__name__)

# What the runner calls with each update; awaited, so a failure to record one (a full disk) ends the run.
OnEvent = Callable[[Update], Awaitable[None]]


class TrainingFailed(RuntimeError):
    """Training could not finish; the message is the reason shown on the job (no stack trace)."""


def internal_error(what: str, exc: BaseException) -> str:
    """`what` and an error id for the tenant; the exception, which may name paths and library internals,
    goes to the server log under the same id."""
    error_id = secrets.token_hex(6)
    log.error("%s (error id %s)", what, error_id, exc_info=exc)
    return f"{what} (error id {error_id}); the server log has the details"


class Runner(Protocol):
    async def run(
        self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: TrainParams, on_event: OnEvent
    ) -> TrainResult:
        """Train with the method the params' type names (methods/registry.py) and return its result. Awaits
        `on_event(update)` on the event loop for each update (see `updates.py`); raises
        TrainingFailed with a readable reason; cancelling the awaiting task, or `on_event` raising,
        must stop the underlying work. A job run again under the same id resumes from its checkpoint, if any."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop the job's work if it is running; a no-op for unknown or finished jobs."""
        ...

    def discard(self, job_id: str) -> None:
        """Forget the job's checkpoints: it reached a terminal state and will never resume."""
        ...
