"""The worker's entry into training: one call for every method, logging to the job's run when it is tracked.

Runs where the job runs (a Ray worker); the job's method is found by the type of its parameters.
"""

from __future__ import annotations

import dataclasses

from adaptgate.training.methods.method import TrainParams, TrainResult
from adaptgate.training.methods.registry import method_of
from adaptgate.training.runners.updates import Report
from adaptgate.training.tracking import log_confusion, open_tracker, tracked_report

# Parameters that say where a job runs or logs, not how it trains: kept out of the tracked hyperparameters.
UNTRACKED_PARAMS = ("tracking", "checkpoint_dir", "base_fingerprint")


def hyperparameters(params: TrainParams, texts: list[str], labels: list[str]) -> dict[str, object]:
    """Everything the job trains with, as asked (0 = the method's default), plus the data's size."""
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name not in UNTRACKED_PARAMS}  # type: ignore[arg-type]
    fields.update(params_class=type(params).__name__, rows=len(texts), label_count=len(set(labels)))
    fields.update(method_of(params).tracked(params))
    return fields


def train(texts: list[str], labels: list[str], model_dir: str, params: TrainParams, report: Report) -> TrainResult:
    """Runs the job's method, logging its hyperparameters, evaluations and final metrics to its run."""
    method = method_of(params)
    tracker = open_tracker(params.tracking)
    tracker.log_params(hyperparameters(params, texts, labels))
    result = method.train(texts, labels, model_dir, params, tracked_report(tracker, report))
    tracker.log_metrics({f"final_{k}": v for k, v in result.metrics.items()}, method.final_step(params, result))
    log_confusion(tracker, result.labels, result.confusion)
    return result
