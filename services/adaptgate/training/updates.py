"""Training updates: the plain dicts a training run reports and the manager turns into events.

Plain dicts (not dataclasses) because they cross process boundaries through Ray and must
unpickle in a gateway that may run another version of this package. Keys:
  kind         "started" | "progress" | "eval" | "log"
  message      a human sentence
  progress     0..1 over the whole run
  eta_seconds  estimated seconds left (0 when unknown)
  metrics      {"accuracy", "macro_f1", "loss"} for "eval"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Update = dict[str, Any]
Report = Callable[[Update], None]


def make_update(
    kind: str, message: str, progress: float, eta_seconds: float = 0.0, metrics: dict[str, float] | None = None
) -> Update:
    return {
        "kind": kind,
        "message": message,
        "progress": float(progress),
        "eta_seconds": float(eta_seconds),
        "metrics": dict(metrics or {}),
    }
