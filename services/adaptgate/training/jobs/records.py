"""The records of a finetuning job: its spec, its state, its event log, and what it publishes."""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from adaptgate.training.methods.auto import AUTO


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


@dataclass
class JobSpec:
    """What a tenant asked for. Zero means "the method's default" for epochs and learning_rate; the
    method is a registered one's name (methods/registry.py) or `auto`, the default. Not frozen only so
    that JobRecord can extend it (dataclasses refuse a mutable subclass of a frozen one): treat it as a value."""

    dataset_id: str
    adapter_name: str
    method: str = AUTO
    alias: str = ""
    validation_fraction: float = 0.1
    epochs: int = 0
    learning_rate: float = 0.0
    seed: int = 0
    # LoRA options (0 = the method's default) and whether 'auto' chose the method.
    lora_rank: int = 0
    batch_size: int = 0
    max_tokens: int = 0
    max_steps: int = 0
    auto: bool = False
    # Wall-clock seconds the job may run (0 = the server's limit, which also caps it).
    max_seconds: int = 0
    # A dataset of the same tenant to validate on instead of a split of dataset_id ("" = split).
    validation_dataset_id: str = ""
    # Rows with this label are out of scope: never learnt, they set the abstain threshold ("" = none).
    out_of_scope_label: str = ""


# Spec fields stored together as JSON in the jobs table's `options` column.
OPTION_FIELDS = ("lora_rank", "batch_size", "max_tokens", "max_steps", "auto", "max_seconds", "validation_dataset_id", "out_of_scope_label")


@dataclass(kw_only=True)
class JobRecord(JobSpec):
    """A job as stored and as the API shows it: its spec's fields, then its own (keyword-only)."""

    id: str
    tenant: str
    state: JobState = JobState.QUEUED
    error: str = ""
    adapter_ref: str = ""
    progress: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    # What the job learnt beyond the scalar metrics: {"confusion": {"labels", "matrix"}, "blocks": [...]}.
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, tenant: str, spec: JobSpec) -> JobRecord:
        now = time.time()
        return cls(id="job-" + secrets.token_hex(6), tenant=tenant, **spec_fields(spec), created_at=now, updated_at=now)

    @property
    def spec(self) -> JobSpec:
        return JobSpec(**spec_fields(self))

    @property
    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OPTION_FIELDS}


def spec_fields(source: JobSpec) -> dict[str, Any]:
    """Every JobSpec field by name, read from a spec or from a record (a spec with more fields)."""
    return {f.name: getattr(source, f.name) for f in fields(JobSpec)}


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
    details: dict[str, Any] = field(default_factory=dict)

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
