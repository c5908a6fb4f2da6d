"""The base model a training worker loads: the gateway's, found at the gateway's path, or the job fails in words.

On a Ray cluster the worker reads the model from its own filesystem at the path the gateway
passed, so a worker without the model volume, or with another model there, must say so
instead of failing inside transformers or training an adapter the gateway would refuse."""

from __future__ import annotations

from pathlib import Path

from adaptgate.engine.model import BaseModel, load_base_model
from adaptgate.errors import FailedPrecondition


class WorkerBaseModel(FailedPrecondition):
    """The worker's base model is missing or is not the gateway's; the message says which and where."""


def load_training_base(model_dir: str, fingerprint: str, dtype: str, device: str) -> BaseModel:
    """Loads the base model at `model_dir`; `fingerprint` is the gateway's ("" = not checked)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise WorkerBaseModel(
            f"the Ray worker cannot find the base model at {path}; "
            "mount the gateway's model directory on the Ray workers at the same path"
        )
    base = load_base_model(path, dtype=dtype, device=device)
    if fingerprint and base.spec.fingerprint != fingerprint:
        raise WorkerBaseModel(
            f"the Ray worker's base model at {path} is not the gateway's "
            f"(fingerprint {base.spec.fingerprint}, expected {fingerprint})"
        )
    return base
