"""Training updates: the plain dicts a training run reports and the manager turns into events.

Plain dicts (not dataclasses) because they cross process boundaries through Ray and must
unpickle in a gateway that may run another version of this package. Keys:
  kind         "started" | "progress" | "eval" | "log"
  message      a human sentence
  progress     0..1 over the whole run
  eta_seconds  estimated seconds left (0 when unknown)
  metrics      {"accuracy", "macro_f1", "loss"} for "eval"
  details      optional, JSON-able: {"confusion": {"labels", "matrix"}} on the final evaluation,
               {"blocks": [...]} for per-block learning rates, {"method": ...} for auto's choice
  worker_pid   optional, on "started": the Ray worker running the job
  step         optional, on "eval" and per-block learning-rate "log"s: the training step they belong to
Kind "skip" is a placeholder a resumed Ray attempt yields to keep its stream aligned; it carries
nothing and consumers drop it (see ray_runner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Update = dict[str, Any]
Report = Callable[[Update], None]


def make_update(
    kind: str, message: str, progress: float, eta_seconds: float = 0.0, metrics: dict[str, float] | None = None,
    details: dict[str, Any] | None = None, step: int | None = None,
) -> Update:
    update: Update = {
        "kind": kind,
        "message": message,
        "progress": float(progress),
        "eta_seconds": float(eta_seconds),
        "metrics": dict(metrics or {}),
    }
    if details:
        update["details"] = details
    if step is not None:
        update["step"] = int(step)
    return update
