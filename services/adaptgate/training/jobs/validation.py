"""Checks on a submitted job: its method (each method's own checks, methods/registry.py), names and numeric ranges.

Everything a job could fail on that is visible at submission is refused here with
INVALID_ARGUMENT, so jobs do not fail minutes later for a typo.
"""

from __future__ import annotations

import dataclasses
import math

from adaptgate.adapters import refs
from adaptgate.errors import InvalidArgument
from adaptgate.training.data.datasets import DatasetRecord
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.records import JobSpec
from adaptgate.training.methods.auto import AUTO
from adaptgate.training.methods.registry import METHODS, method_named, resolve

DEFAULT_VALIDATION_FRACTION = 0.1
MAX_VALIDATION_FRACTION = 0.5
MAX_EPOCHS = 100_000
MAX_SEED = 2**63 - 1
MAX_LORA_RANK = 64
MAX_BATCH_SIZE = 1024
MAX_TOKENS = 8192
MAX_STEPS = 10_000_000


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
    for name, limit in (
        ("lora_rank", MAX_LORA_RANK), ("batch_size", MAX_BATCH_SIZE), ("max_tokens", MAX_TOKENS), ("max_steps", MAX_STEPS),
    ):
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

    'auto' stays 'auto' here: choosing needs the dataset (see methods/auto.py), and the chosen
    method's own checks run then (`check_method`)."""
    check_name("adapter_name", spec.adapter_name)
    if spec.alias:
        check_name("alias", spec.alias)
    fraction = spec.validation_fraction or DEFAULT_VALIDATION_FRACTION
    resolved = dataclasses.replace(spec, method=resolve(spec.method), validation_fraction=fraction)
    _check_numbers(resolved, limits)
    check_method(resolved, limits)
    return resolved


def check_method(spec: JobSpec, limits: JobLimits) -> None:
    """What the spec's method refuses on this server (a LoRA rank the adapter store would not take);
    nothing yet for 'auto': the job manager checks the method it chooses."""
    if spec.method != AUTO:
        method_named(spec.method).check(spec, limits)


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
    if spec.method != AUTO and not method_named(spec.method).abstains:
        able = " or ".join(name for name, method in METHODS.items() if method.abstains)
        raise InvalidArgument(f"out_of_scope_label works with the {able} method (or auto, which then picks it), not {spec.method!r}")
    if label not in training.label_counts:
        raise InvalidArgument(f"out_of_scope_label {label!r} marks no row of dataset {training.id!r}")
    if len(training.label_counts) < 3:
        raise InvalidArgument(f"with out_of_scope_label {label!r}, dataset {training.id!r} leaves fewer than 2 classes to learn")
