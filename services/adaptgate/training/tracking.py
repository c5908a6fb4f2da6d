"""Experiment tracking: one MLflow run per finetuning job, written from where each part of the job happens.

- The control replica opens the job's run once (`open_job_run`), before the first training attempt,
  and keeps its id in the job's record (`details["tracking"]`): a gateway restart, a takeover by
  another replica and a Ray retry all continue that run instead of starting a second one. It logs
  what only it knows: tenant, job, dataset, the method and why `auto` chose it, and at the end the
  published adapter and the outcome (`close_job_run`).
- The training worker (the Ray task, or whatever runs `methods.train`) logs the hyperparameters,
  every evaluation's metrics with its step, the per-block learning rates and the confusion matrix
  (`Tracker`). The run id and the tracking URI travel to it inside the job's parameters
  (`TrackingSpec`), so nothing on the worker needs the gateway's settings.

Tracking is best effort: a tracking server that is down or refuses a call never fails a job. The
first failure is logged once as a WARNING and that tracker stops calling it (each call against a dead
server costs its retries and timeout; one job must not pay them at every evaluation). mlflow is
imported only by a tracker that is on, so with tracking off it is never loaded.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from adaptgate.training.runners.updates import Report, Update

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "adaptgate"
CONFUSION_JSON = "confusion_matrix.json"
CONFUSION_CSV = "confusion_matrix.csv"
ADAPTER_JSON = "adapter.json"
# Unless the operator set them: a dead tracking server costs a job seconds, not MLflow's minutes of retries.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
END_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter's value
_VERSION = re.compile(r"@v?(\d+)$")


@dataclass(frozen=True)
class TrackingConfig:
    """The gateway's tracking settings (`mlflow_tracking_uri`, `mlflow_experiment`); `uri` empty = off."""

    uri: str = ""
    experiment: str = DEFAULT_EXPERIMENT

    @property
    def enabled(self) -> bool:
        return bool(self.uri)


@dataclass(frozen=True)
class TrackingSpec:
    """What a training worker needs to log into its job's run; travels (pickled) with the job's parameters."""

    uri: str
    run_id: str


class Tracker(Protocol):
    """What training code calls; `NoopTracker` when tracking is off."""

    def log_params(self, params: Mapping[str, object]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_dict(self, data: object, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...


class NoopTracker:
    """Tracking off: every call does nothing (and mlflow is never imported)."""

    def log_params(self, params: Mapping[str, object]) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        return None

    def log_dict(self, data: object, artifact_file: str) -> None:
        return None

    def log_text(self, text: str, artifact_file: str) -> None:
        return None


def _client(uri: str) -> Any:
    """An MlflowClient for `uri` (no process-wide tracking URI is set: several servers may coexist)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _param_value(value: object) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)
    return text[:MAX_PARAM_CHARS]


class MlflowTracker:
    """Logs into one existing run. Never raises: the first failure is a WARNING, then the tracker goes quiet."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.failed = False
        self._mlflow: Any = None

    def _call(self, what: str, action: Callable[[Any, Any], object]) -> None:
        """Runs `action(client, mlflow.entities)` unless an earlier call failed."""
        if self.failed:
            return
        try:
            if self._mlflow is None:
                self._mlflow = _client(self.uri)
            import mlflow.entities

            action(self._mlflow, mlflow.entities)
        except Exception as exc:  # noqa: BLE001 - any tracking failure (server down, refused, mlflow missing) is tolerated
            self.failed = True
            log.warning("experiment tracking stopped for MLflow run %s at %s: could not %s (%s); the job carries on",
                        self.run_id, self.uri, what, exc)

    def log_params(self, params: Mapping[str, object]) -> None:
        self._call("log parameters", lambda c, e: c.log_batch(
            self.run_id, params=[e.Param(k, _param_value(v)) for k, v in params.items()]))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._call("log metrics", lambda c, e: c.log_batch(
            self.run_id, metrics=[e.Metric(k, float(v), now, int(step)) for k, v in metrics.items()]))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._call("set tags", lambda c, e: c.log_batch(self.run_id, tags=[e.RunTag(k, str(v)) for k, v in tags.items()]))

    def log_dict(self, data: object, artifact_file: str) -> None:
        self._call(f"upload {artifact_file}", lambda c, e: c.log_dict(self.run_id, data, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call(f"upload {artifact_file}", lambda c, e: c.log_text(self.run_id, text, artifact_file))

    def end(self, status: str) -> None:
        self._call("end the run", lambda c, e: c.set_terminated(self.run_id, status))


def open_tracker(spec: TrackingSpec | None) -> Tracker:
    """The worker's tracker for its job: a no-op without a spec (tracking off, or no run could be opened)."""
    if spec is None or not spec.uri or not spec.run_id:
        return NoopTracker()
    return MlflowTracker(spec.uri, spec.run_id)


# ----- the worker side: what `methods.train` logs ---------------------------------------------------


def block_metrics(blocks: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """A per-block learning-rate table (runners/updates.py `details.blocks`) as metrics: rate, HTSR alpha, multiplier."""
    out: dict[str, float] = {}
    for row in blocks:
        block = int(row.get("block", -1))
        name = f"block_{block}" if block >= 0 else "block_other"
        out[f"lr_{name}"] = float(row.get("learning_rate", 0.0))
        out[f"htsr_alpha_{name}"] = float(row.get("alpha", 0.0))
        out[f"lr_multiplier_{name}"] = float(row.get("multiplier", 0.0))
    return out


def confusion_csv(labels: list[str], matrix: list[list[int]]) -> str:
    """Rows are true labels, columns predicted ones, the header row names the predictions."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["true\\predicted", *labels])
    for label, row in zip(labels, matrix):
        writer.writerow([label, *row])
    return out.getvalue()


def log_confusion(tracker: Tracker, labels: list[str], matrix: list[list[int]]) -> None:
    if not matrix:
        return
    tracker.log_dict({"labels": labels, "matrix": matrix, "rows": "true", "columns": "predicted"}, CONFUSION_JSON)
    tracker.log_text(confusion_csv(labels, matrix), CONFUSION_CSV)


def tracked_report(tracker: Tracker, report: Report) -> Report:
    """`report`, also logging each evaluation's metrics (at its step) and each per-block learning-rate table.
    The final evaluation (the one carrying the confusion matrix) is logged from the result instead."""
    if isinstance(tracker, NoopTracker):
        return report
    evaluations = 0
    last_step = 0

    def forward(update: Update) -> None:
        nonlocal evaluations, last_step
        report(update)  # first: the job's own event stream never waits on the tracking server
        details = update.get("details") or {}
        step = update.get("step")
        if isinstance(step, int):
            last_step = step
        if update.get("kind") == "eval" and update.get("metrics") and "confusion" not in details:
            evaluations += 1
            tracker.log_metrics(update["metrics"], step if isinstance(step, int) else evaluations)
        if details.get("blocks"):
            tracker.log_metrics(block_metrics(details["blocks"]), last_step)

    return forward


# ----- the control replica's side: the job's run --------------------------------------------------


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created when missing (another replica may create it at the same moment)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name))
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def open_job_run(config: TrackingConfig, job_id: str, tags: Mapping[str, str], params: Mapping[str, object]) -> str:
    """Creates the job's run (named after the job) and returns its id; "" when the server cannot be reached
    (a WARNING, and the job trains untracked). Blocking: call it off the event loop."""
    try:
        client = _client(config.uri)
        run = client.create_run(_experiment_id(client, config.experiment), tags=dict(tags), run_name=job_id)
    except Exception as exc:  # noqa: BLE001 - tracking never fails a job
        log.warning("job %s runs without experiment tracking: could not open an MLflow run at %s (%s)",
                    job_id, config.uri, exc)
        return ""
    run_id = str(run.info.run_id)
    MlflowTracker(config.uri, run_id).log_params(params)
    return run_id


def adapter_version(ref: str) -> str:
    """'acme/spam@v3' -> '3' ('' when the reference names no version)."""
    found = _VERSION.search(ref)
    return found.group(1) if found else ""


def close_job_run(config: TrackingConfig, run_id: str, state: str, adapter_ref: str, error: str) -> None:
    """Records the outcome, and the published adapter of a successful job, then ends the run. Never raises."""
    tracker = MlflowTracker(config.uri, run_id)
    tags = {"state": state}
    if error:
        tags["error"] = error[:5000]
    if adapter_ref:
        tags.update(adapter_ref=adapter_ref, adapter_version=adapter_version(adapter_ref))
        tracker.log_dict({"adapter": adapter_ref, "version": adapter_version(adapter_ref)}, ADAPTER_JSON)
    tracker.set_tags(tags)
    tracker.end(END_STATUS.get(state, "FINISHED"))
