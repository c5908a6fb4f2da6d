"""Checks on a submitted job that need no dataset: method, names and numeric ranges.

Everything a job could fail on that is visible at submission is refused here with
INVALID_ARGUMENT, so jobs do not fail minutes later for a typo.
"""

from __future__ import annotations

import dataclasses
import math
import re

from adaptgate.errors import InvalidArgument
from adaptgate.training.job_records import JobSpec

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
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


def resolve_method(method: str) -> str:
    """The method's canonical name: 'auto' (or empty), 'head', 'lora' or 'embed'; 'auto' is decided per dataset."""
    name = method.strip().lower() or "auto"
    if name in ("auto", *AVAILABLE_METHODS):
        return name
    if name in PLANNED_METHODS:
        raise InvalidArgument(f"method {name!r} is not available yet; use 'head', 'lora', 'embed' or 'auto'")
    raise InvalidArgument(f"unknown method {method!r}; use 'head', 'lora', 'embed' or 'auto'")


def check_name(kind: str, value: str) -> None:
    if not NAME_PATTERN.match(value):
        raise InvalidArgument(
            f"{kind} {value!r} is not valid: use 1-64 lowercase letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


def _check_numbers(spec: JobSpec) -> None:
    if not 0 < spec.validation_fraction <= MAX_VALIDATION_FRACTION:
        raise InvalidArgument(f"validation_fraction must be in (0, {MAX_VALIDATION_FRACTION}]; got {spec.validation_fraction}")
    if not 0 <= spec.epochs <= MAX_EPOCHS:
        raise InvalidArgument(f"epochs must be between 0 (the default) and {MAX_EPOCHS}; got {spec.epochs}")
    if not (math.isfinite(spec.learning_rate) and 0 <= spec.learning_rate <= 10):
        raise InvalidArgument(f"learning_rate must be between 0 (the default) and 10; got {spec.learning_rate}")
    if not 0 <= spec.seed <= MAX_SEED:
        raise InvalidArgument(f"seed must be between 0 and {MAX_SEED}; got {spec.seed}")
    for name, limit in (("lora_rank", MAX_LORA_RANK), ("batch_size", MAX_BATCH_SIZE), ("max_tokens", MAX_TOKENS),
                        ("max_steps", MAX_STEPS)):
        value = getattr(spec, name)
        if not 0 <= value <= limit:
            raise InvalidArgument(f"{name} must be between 0 (the default) and {limit}; got {value}")
    if spec.max_tokens == 1:
        raise InvalidArgument("max_tokens must be at least 2 (the special tokens take two)")


def normalized_spec(spec: JobSpec) -> JobSpec:
    """The spec with its method's name checked and defaults filled in; raises InvalidArgument.

    'auto' stays 'auto' here: choosing needs the dataset (see methods.choose_method)."""
    check_name("adapter_name", spec.adapter_name)
    if spec.alias:
        check_name("alias", spec.alias)
    fraction = spec.validation_fraction or DEFAULT_VALIDATION_FRACTION
    resolved = dataclasses.replace(spec, method=resolve_method(spec.method), validation_fraction=fraction)
    _check_numbers(resolved)
    return resolved
