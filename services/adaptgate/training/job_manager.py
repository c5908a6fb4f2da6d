"""Runs finetuning jobs: submit, run on the runner (Ray), publish the adapter, stream events.

One asyncio task per live job drives it from QUEUED to a terminal state; every change is a
job-row update plus an event in one SQLite transaction, so `WatchJob` can replay a job's whole
history and a restarted gateway finds its unfinished jobs and runs them again (`start()`; LoRA jobs
continue from their checkpoint, see TRAINING.md).
Publishing is the commit point: a cancel that arrives while the adapter is being written
waits for it and returns the SUCCEEDED job, so a cancelled job never leaves a version behind.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptgate.adapters.format import head_only_files, lora_files
from adaptgate.errors import AdaptgateError, JobNotFound, ResourceExhausted, Unavailable
from adaptgate.training.datasets import DatasetStore
from adaptgate.training.database import Database
from adaptgate.training.embed import EmbedParams, EmbedResult
from adaptgate.training.evaluation import describe_confusion
from adaptgate.training.head import HeadParams
from adaptgate.training.job_records import EVENT_KINDS, JobEvent, JobRecord, JobSpec, JobState, Publish, PublishRequest
from adaptgate.training.job_signals import JobSignals
from adaptgate.training.job_store import JobStore
from adaptgate.training.job_validation import normalized_spec
from adaptgate.training.lora import LoraOutcome, LoraParams
from adaptgate.training.methods import TrainParams, TrainResult, choose_method
from adaptgate.training.runner import Runner, TrainingFailed
from adaptgate.training.updates import Update

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 10.0
WATCH_SAFETY_WAKE_S = 5.0
RESUMED = "resumed after gateway restart"


@dataclass
class _Run:
    """The live part of a job in this process."""

    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    publishing: bool = False


def failure_message(exc: Exception) -> str:
    if isinstance(exc, AdaptgateError):
        return exc.message
    if isinstance(exc, TrainingFailed):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"


def training_params(record: JobRecord) -> TrainParams:
    """The runner's parameters for a job record (the record keeps what the tenant asked for)."""
    if record.method in ("lora", "embed"):
        kind = EmbedParams if record.method == "embed" else LoraParams
        return kind(
            validation_fraction=record.validation_fraction, epochs=record.epochs, learning_rate=record.learning_rate,
            seed=record.seed, batch_size=record.batch_size, rank=record.lora_rank, max_tokens=record.max_tokens,
            max_steps=record.max_steps, auto=record.auto,
        )
    return HeadParams(
        validation_fraction=record.validation_fraction, epochs=record.epochs,
        learning_rate=record.learning_rate, seed=record.seed,
    )


def result_files(record: JobRecord, result: TrainResult) -> dict[str, bytes]:
    """The adapter directory a finished job publishes; refuses non-finite weights."""
    head = None if isinstance(result, EmbedResult) else (result.weight, result.bias)
    tensors = list(head or ())
    if isinstance(result, LoraOutcome):
        tensors += [t for pair in result.lora.values() for t in pair]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise TrainingFailed("training diverged: the trained weights are not finite")
    source = f"job:{record.id}"
    if isinstance(result, LoraOutcome):  # `embed` (no head, read as `pooling`) or `lora` (with its head)
        head_input = result.pooling if isinstance(result, EmbedResult) else result.head_input
        weight, bias = head or (None, None)
        return lora_files(
            result.lora, result.rank, result.alpha, weight, bias, result.labels, result.fingerprint, source,
            base_prefix=result.base_prefix, head_input=head_input, normalize=result.normalize,
        )
    return head_only_files(
        result.weight, result.bias, result.labels, result.fingerprint, source,
        head_input=result.head_input, normalize=result.normalize,
    )


class JobManager:
    def __init__(
        self, db: Database, datasets: DatasetStore, runner: Runner, publish: Publish, model_dir: Path,
        max_active_per_tenant: int = 4,
    ) -> None:
        self._store = JobStore(db)
        self._datasets = datasets
        self._runner = runner
        self._publish = publish
        self._model_dir = Path(model_dir)
        self._max_active = max_active_per_tenant
        self._signals = JobSignals()
        self._runs: dict[str, _Run] = {}
        self._closed = False

    # ----- public API -------------------------------------------------------------------------

    async def start(self) -> None:
        """Runs again the jobs a previous gateway process left QUEUED or RUNNING."""
        for record in self._store.unfinished():
            if record.id not in self._runs:
                record.state, record.progress = JobState.QUEUED, 0.0
                self._emit(record, "log", RESUMED)
                self._launch(record)

    async def submit(self, tenant: str, spec: JobSpec) -> JobRecord:
        if self._closed:
            raise Unavailable("the gateway is shutting down; submit the job again shortly")
        resolved = normalized_spec(spec)
        dataset = self._datasets.get(tenant, resolved.dataset_id)
        self._check_quota(tenant)
        note = ""
        if resolved.method == "auto":
            method, note = choose_method(dataset.rows, len(dataset.label_counts))
            resolved = dataclasses.replace(resolved, method=method, auto=True)
        record = JobRecord.new(tenant, resolved)
        if note:
            record.details["method"] = {"chosen": resolved.method, "reason": note}
        self._store.insert(record, self._event(record, "state", f"queued: {resolved.method} on dataset {dataset.id}"))
        if note:
            self._emit(record, "log", note, details={"method": record.details["method"]})
        self._launch(record)
        return dataclasses.replace(record)  # the running task keeps mutating its own copy

    async def get(self, tenant: str | None, job_id: str) -> JobRecord:
        return self._owned(tenant, job_id)

    async def list(self, tenant: str | None) -> builtins.list[JobRecord]:
        return self._store.list_jobs(tenant)

    async def cancel(self, tenant: str | None, job_id: str) -> JobRecord:
        """CANCELLED within seconds and nothing published; a terminal job is returned unchanged."""
        record = self._owned(tenant, job_id)
        if record.state.terminal:
            return record
        run = self._runs.get(job_id)
        if run is None or run.task is None:
            self._set_state(record, JobState.CANCELLED, "cancelled")
            self._discard(job_id)
            return record
        if not run.publishing:
            run.cancel_requested = True
            self._runner.cancel(job_id)
            run.task.cancel()
        await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)
        return self._owned(None, job_id)

    async def watch(self, tenant: str | None, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event from seq 1, then live ones, until the terminal state event."""
        self._owned(tenant, job_id)
        seq = 0
        while True:
            events = self._store.events_after(job_id, seq)
            if not events:
                if self._closed or self._finished_without_event(job_id):
                    return
                await self._signals.wait(job_id, WATCH_SAFETY_WAKE_S)
                continue
            for event in events:
                yield event
                seq = event.seq
                if event.final:
                    return

    def counts_by_state(self) -> dict[str, int]:
        return self._store.counts_by_state()

    async def close(self) -> None:
        """Stops driving jobs without marking them: the next `start()` runs them again."""
        self._closed = True
        self._signals.notify_all()
        for job_id, run in list(self._runs.items()):
            if not run.publishing and run.task is not None:
                self._runner.cancel(job_id)
                run.task.cancel()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- lookups ----------------------------------------------------------------------------

    def _owned(self, tenant: str | None, job_id: str) -> JobRecord:
        """Another tenant's job is 'not found', exactly like a missing one."""
        record = self._store.get(job_id)
        if record is None or (tenant is not None and record.tenant != tenant):
            raise JobNotFound(f"job {job_id!r} not found")
        return record

    def _check_quota(self, tenant: str) -> None:
        active = self._store.active_count(tenant)
        if active >= self._max_active:
            raise ResourceExhausted(
                f"tenant {tenant!r} already has {active} queued or running jobs (the limit is {self._max_active}); "
                "wait for one to finish or cancel one"
            )

    def _finished_without_event(self, job_id: str) -> bool:
        record = self._store.get(job_id)
        return record is None or record.state.terminal

    # ----- records and events -----------------------------------------------------------------

    @staticmethod
    def _event(
        record: JobRecord, kind: str, message: str, metrics: dict[str, float] | None = None, eta: float = 0.0,
        details: dict[str, object] | None = None,
    ) -> JobEvent:
        record.updated_at = time.time()
        return JobEvent(
            record.id, 0, record.updated_at, record.state, kind, message, record.progress, dict(metrics or {}), eta,
            dict(details or {}),
        )

    def _emit(
        self, record: JobRecord, kind: str, message: str, metrics: dict[str, float] | None = None, eta: float = 0.0,
        details: dict[str, object] | None = None,
    ) -> JobEvent:
        event = self._store.save(record, self._event(record, kind, message, metrics, eta, details))
        self._signals.notify(record.id)
        return event

    def _set_state(
        self, record: JobRecord, state: JobState, message: str, error: str = "", details: dict[str, object] | None = None
    ) -> None:
        record.state, record.error = state, error
        self._emit(record, "state", message, record.metrics, details=details)

    # ----- running a job ----------------------------------------------------------------------

    def _launch(self, record: JobRecord) -> None:
        run = _Run()
        self._runs[record.id] = run
        run.task = asyncio.create_task(self._execute(record, run), name=f"adaptgate {record.id}")

    async def _execute(self, record: JobRecord, run: _Run) -> None:
        try:
            result = await self._train(record, run)
            run.publishing = True
            self._succeed(record, result, await self._publish_result(record, result))
        except asyncio.CancelledError:
            if not run.cancel_requested:
                raise  # gateway shutdown: the record stays unfinished and resumes on restart
            self._set_state(record, JobState.CANCELLED, "cancelled")
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's FAILED reason
            self._fail(record, run, exc)
        finally:
            self._runs.pop(record.id, None)
            if record.state.terminal:
                self._discard(record.id)

    def _discard(self, job_id: str) -> None:
        discard = getattr(self._runner, "discard", None)
        if discard is None:
            return
        try:
            discard(job_id)
        except Exception:  # noqa: BLE001 - a leftover checkpoint directory is harmless
            log.warning("could not remove the checkpoints of job %s", job_id, exc_info=True)

    async def _train(self, record: JobRecord, run: _Run) -> TrainResult:
        dataset = self._datasets.get(None, record.dataset_id)
        texts, labels = await asyncio.to_thread(self._datasets.load, dataset)
        return await self._runner.run(
            record.id, texts, labels, str(self._model_dir), training_params(record), lambda u: self._on_update(record, run, u)
        )

    def _on_update(self, record: JobRecord, run: _Run, update: Update) -> None:
        """A runner update becomes an event; the first one moves the job to RUNNING."""
        if record.state.terminal or run.cancel_requested:
            return
        kind, message = str(update.get("kind", "log")), str(update.get("message", ""))
        if kind == "skip":
            return
        if record.state is JobState.QUEUED:
            self._set_state(record, JobState.RUNNING, message if kind == "started" else "running")
            if kind == "started":
                return
        record.progress = max(record.progress, min(1.0, float(update.get("progress", 0.0))))
        metrics = {k: float(v) for k, v in dict(update.get("metrics") or {}).items()}
        if kind == "eval" and metrics:
            record.metrics = metrics
        details = dict(update.get("details") or {})
        for key in ("confusion", "blocks"):
            if key in details:
                record.details[key] = details[key]
        event_kind = kind if kind in EVENT_KINDS else "log"
        self._emit(record, event_kind, message, metrics, float(update.get("eta_seconds", 0.0)), details)

    async def _publish_result(self, record: JobRecord, result: TrainResult) -> str:
        files = result_files(record, result)
        request = PublishRequest(record.tenant, record.adapter_name, files, record.alias, f"job:{record.id}")
        return await asyncio.to_thread(self._publish, request)

    def _succeed(self, record: JobRecord, result: TrainResult, ref: str) -> None:
        record.adapter_ref, record.metrics, record.progress = ref, dict(result.metrics), 1.0
        alias = f" and moved alias {record.alias!r}" if record.alias else ""
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        details: dict[str, object] = {}
        confusion = ""
        if result.confusion:
            details["confusion"] = record.details["confusion"] = {"labels": result.labels, "matrix": result.confusion}
            if text := describe_confusion(result.labels, result.confusion):
                confusion = f"; {text}"
        message = f"published {ref}{alias} (validation {summary}){confusion}"
        self._set_state(record, JobState.SUCCEEDED, message, details=details)

    def _fail(self, record: JobRecord, run: _Run, exc: Exception) -> None:
        if run.cancel_requested:
            self._set_state(record, JobState.CANCELLED, "cancelled")
            return
        if not isinstance(exc, (AdaptgateError, TrainingFailed)):
            log.exception("job %s failed", record.id, exc_info=exc)
        reason = failure_message(exc)
        self._set_state(record, JobState.FAILED, f"failed: {reason}", error=reason)
