"""Checks on a submitted job that need no dataset: method, names and numeric ranges.

Everything a job could fail on that is visible at submission is refused here with
INVALID_ARGUMENT, so jobs do not fail minutes later for a typo.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from adaptgate.adapters import refs
from adaptgate.errors import InvalidArgument, ResourceExhausted
from adaptgate.training.datasets import DatasetRecord
from adaptgate.training.job_records import JobSpec

AVAILABLE_METHODS = ("head", "lora", "embed")
PLANNED_METHODS: tuple[str, ...] = ()
DEFAULT_VALIDATION_FRACTION = 0.1
MAX_VALIDATION_FRACTION = 0.5
MAX_EPOCHS = 100_000
MAX_SEED = 2**63 - 1
MAX_LORA_RANK = 64
MAX_BATCH_SIZE = 1024
MAX_TOKENS = 8192
MAX_STEPS = 10_000_000
DEFAULT_MAX_JOB_SECONDS = 6 * 3600


@dataclass(frozen=True)
class JobLimits:
    """What one server allows: jobs in flight per tenant and in all (0 = no limit), a job's wall-clock
    seconds, and the LoRA rank its adapter store accepts (training a rank publishing refuses wastes the run)."""

    active_per_tenant: int = 4
    active_total: int = 32
    max_job_seconds: int = DEFAULT_MAX_JOB_SECONDS
    max_lora_rank: int = 16

    def time_limit(self, max_seconds: int) -> int:
        """A job's limit: what it asked for (0 = the server's), never above the server's."""
        return min(max_seconds or self.max_job_seconds, self.max_job_seconds)

    def check_room(self, tenant: str, tenant_active: int, total_active: int) -> None:
        """Refuses one more job when the tenant, or the server, is at its limit of queued and running jobs."""
        if self.active_per_tenant and tenant_active >= self.active_per_tenant:
            raise ResourceExhausted(
                f"tenant {tenant!r} already has {tenant_active} queued or running jobs (the limit is "
                f"{self.active_per_tenant}); wait for one to finish or cancel one"
            )
        if self.active_total and total_active >= self.active_total:
            raise ResourceExhausted(
                f"the server already has {total_active} queued or running jobs (the limit is {self.active_total}); "
                "submit again when one has finished"
            )


def resolve_method(method: str) -> str:
    """The method's canonical name: 'auto' (or empty), 'head', 'lora' or 'embed'; 'auto' is decided per dataset."""
    name = method.strip().lower() or "auto"
    if name in ("auto", *AVAILABLE_METHODS):
        return name
    if name in PLANNED_METHODS:
        raise InvalidArgument(f"method {name!r} is not available yet; use 'head', 'lora', 'embed' or 'auto'")
    raise InvalidArgument(f"unknown method {method!r}; use 'head', 'lora', 'embed' or 'auto'")


def check_name(kind: str, value: str) -> None:
    """The adapter store's own rule, so a job never trains an adapter it then cannot publish."""
    refs.check_name(value, kind)


def _check_numbers(spec: JobSpec, limits: JobLimits) -> None:
    if not 0 < spec.validation_fraction <= MAX_VALIDATION_FRACTION:
        raise InvalidArgument(f"validation_fraction must be in (0, {MAX_VALIDATION_FRACTION}]; got {spec.validation_fraction}")
    if not 0 <= spec.epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"epochs must be between 0 (the default) and {MAX_EPOCHS}; got {spec.epochs}")
    if not (math.isfinite(spec.learning_rate) and 0 <= spec.learning_rate <= 10):
        raise InvalidArgument(f"learning_rate must be between 0 (the default) and 10; got {spec.learning_rate}")
    if not 0 <= spec.seed <= MAX_SEED:
        raise InvalidArgument(f"seed must be between 0 and {MAX_SEED}; got {spec.seed}")
    rank = min(MAX_LORA_RANK, limits.max_lora_rank)
    if not 0 <= spec.lora_rank <= rank:
        whose = " (this server's max_lora_rank)" if rank == limits.max_lora_rank else ""
        raise InvalidArgument(f"lora_rank must be between 0 (the default) and {rank}{whose}; got {spec.lora_rank}")
    for name, limit in (("batch_size", MAX_BATCH_SIZE), ("max_tokens", MAX_TOKENS), ("max_steps", MAX_STEPS)):
        value = getattr(spec, name)
        if not 0 <= value <= limit:
            raise InvalidArgument(f"{name} must be between 0 (the default) and {limit}; got {value}")
    if not 0 <= spec.max_seconds <= limits.max_job_seconds:
        raise InvalidArgument(
            f"max_seconds must be between 0 (this server's limit, {limits.max_job_seconds} s) and "
            f"{limits.max_job_seconds}; got {spec.max_seconds}"
        )
    if spec.max_tokens == 1:
        raise InvalidArgument("max_tokens must be at least 2 (the special tokens take two)")


def normalized_spec(spec: JobSpec, limits: JobLimits) -> JobSpec:
    """The spec with its method's name checked and defaults filled in; raises InvalidArgument.

    'auto' stays 'auto' here: choosing needs the dataset (see methods.choose_method)."""
    check_name("adapter_name", spec.adapter_name)
    if spec.alias:
        check_name("alias", spec.alias)
    fraction = spec.validation_fraction or DEFAULT_VALIDATION_FRACTION
    resolved = dataclasses.replace(spec, method=resolve_method(spec.method), validation_fraction=fraction)
    _check_numbers(resolved, limits)
    return resolved


def check_validation_labels(training: DatasetRecord, validation: DatasetRecord) -> None:
    """A validation set may only hold labels the training set teaches: others could never be predicted."""
    unknown = sorted(set(validation.label_counts) - set(training.label_counts))
    if unknown:
        names = ", ".join(repr(u) for u in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InvalidArgument(
            f"validation dataset {validation.id!r} has labels the training dataset {training.id!r} does not: {names}"
        )


def check_out_of_scope_label(spec: JobSpec, training: DatasetRecord) -> None:
    """The out-of-scope label must mark some rows and leave at least two classes to learn."""
    label = spec.out_of_scope_label
    if not label:
        return
    if spec.method not in ("head", "auto"):
        raise InvalidArgument(f"out_of_scope_label works with the head method (or auto, which then picks head), not {spec.method!r}")
    if label not in training.label_counts:
        raise InvalidArgument(f"out_of_scope_label {label!r} marks no row of dataset {training.id!r}")
    if len(training.label_counts) < 3:
        raise InvalidArgument(f"with out_of_scope_label {label!r}, dataset {training.id!r} leaves fewer than 2 classes to learn")
