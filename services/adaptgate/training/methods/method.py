"""What a training method is: one entry of the registry (registry.py) with everything the job's path asks of it.

A job's path is the same for every method: the gateway checks the spec (`check`, against this
server's limits), builds the worker's parameters from the job record (`params_for`; the record
keeps what the tenant asked for, 0 = the method's default), the runner trains (`train`, in a Ray
worker, given a checkpoint directory when the method is `resumable`), and the gateway publishes
the adapter files (`files`). Workers find a job's method by the exact type of its parameters,
which is all a Ray task carries, so the task payload stays what it always was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from adaptgate.training.runners.updates import Report
from adaptgate.training.tracking import TrackingSpec

if TYPE_CHECKING:
    from adaptgate.training.jobs.limits import JobLimits
    from adaptgate.training.jobs.records import JobSpec


class TrainParams(Protocol):
    """What every method's parameters carry (frozen dataclasses, pickled into the Ray task)."""

    validation_fraction: float
    seed: int
    holdout_from: int
    base_fingerprint: str
    tracking: TrackingSpec | None


@dataclass(frozen=True)
class SpecParams:
    """The leading fields every method's parameters take from the job spec as the tenant set them
    (0 = the method's own default for `epochs` and `learning_rate`); a method's parameters extend it."""

    validation_fraction: float = 0.1
    epochs: int = 0
    learning_rate: float = 0.0
    seed: int = 0


class TrainResult(Protocol):
    """What every method's result carries back to the gateway."""

    labels: list[str]
    metrics: dict[str, float]
    confusion: list[list[int]]

    def tensors(self) -> Iterable[torch.Tensor]:
        """The trained weights, checked to be finite before anything is published."""
        ...


@dataclass(frozen=True)
class Context:
    """What the gateway hands a method building a job's parameters: this server's limits and its base model."""

    limits: JobLimits
    base_fingerprint: str = ""


def no_check(spec: JobSpec, limits: JobLimits) -> None:
    """A method that accepts every spec the common checks (jobs/validation.py) let through."""


@dataclass(frozen=True)
class Method:
    """One training method. `name` is what SubmitJob asks for and the job record stores; `params` the
    exact parameter type its worker receives (distinct per method: the worker looks the method up by it)."""

    name: str
    params: type
    params_for: Callable[[JobSpec, Context], Any]  # the worker's parameters for a job (defaults within the limits)
    train: Callable[[list[str], list[str], str, Any, Report], Any]  # (texts, labels, model_dir, params, report)
    files: Callable[[Any, str], dict[str, bytes]]  # (result, source) -> the adapter directory to publish
    check: Callable[[JobSpec, JobLimits], None] = no_check  # refuses at submit what this method cannot do here
    resumable: bool = False  # takes a `checkpoint_dir` and continues from it when its worker dies
    abstains: bool = False  # learns an `out_of_scope_label` and calibrates its abstain threshold
    tracked: Callable[[Any], dict[str, object]] = lambda params: {}  # extra hyperparameters to log (effective values)
    final_step: Callable[[Any, Any], int] = lambda params, result: int(getattr(result, "steps", 0))
