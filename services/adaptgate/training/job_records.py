"""The records of a finetuning job: its spec, its state, its event log, and what it publishes."""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class JobState(enum.Enum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class JobSpec:
    """What a tenant asked for. Zero means "the method's default" for epochs and learning_rate."""

    dataset_id: str
    adapter_name: str
    method: str = "auto"
    alias: str = ""
    validation_fraction: float = 0.1
    epochs: int = 0
    learning_rate: float = 0.0
    seed: int = 0


@dataclass
class JobRecord:
    """A job as stored and as the API shows it; the spec's fields are flattened in."""

    id: str
    tenant: str
    dataset_id: str
    adapter_name: str
    method: str
    alias: str
    validation_fraction: float
    epochs: int
    learning_rate: float
    seed: int
    state: JobState = JobState.QUEUED
    error: str = ""
    adapter_ref: str = ""
    progress: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0

    @classmethod
    def new(cls, tenant: str, spec: JobSpec) -> JobRecord:
        now = time.time()
        return cls(
            id="job-" + secrets.token_hex(6), tenant=tenant, dataset_id=spec.dataset_id,
            adapter_name=spec.adapter_name, method=spec.method, alias=spec.alias,
            validation_fraction=spec.validation_fraction, epochs=spec.epochs,
            learning_rate=spec.learning_rate, seed=spec.seed, created_at=now, updated_at=now,
        )

    @property
    def spec(self) -> JobSpec:
        return JobSpec(
            dataset_id=self.dataset_id, adapter_name=self.adapter_name, method=self.method, alias=self.alias,
            validation_fraction=self.validation_fraction, epochs=self.epochs,
            learning_rate=self.learning_rate, seed=self.seed,
        )


EVENT_KINDS = ("state", "progress", "eval", "log")


@dataclass
class JobEvent:
    """One line of a job's history; `seq` counts 1, 2, 3... per job so a watcher can resume."""

    job_id: str
    seq: int
    time: float
    state: JobState
    kind: str
    message: str = ""
    progress: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    eta_seconds: float = 0.0

    @property
    def final(self) -> bool:
        """The last event of a job: a state change into a terminal state."""
        return self.kind == "state" and self.state.terminal


@dataclass
class PublishRequest:
    """Adapter files a successful job hands to the adapter store (`source` names the job)."""

    tenant: str
    adapter_name: str
    files: dict[str, bytes]
    alias: str = ""
    source: str = ""


# Writes the files as a new version (moving the alias when one is given) and returns its
# reference, e.g. "acme/spam@v3". Synchronous: the manager calls it via asyncio.to_thread.
Publish = Callable[[PublishRequest], str]
