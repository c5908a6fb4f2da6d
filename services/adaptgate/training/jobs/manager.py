"""Runs finetuning jobs: submit, run on the runner (Ray), publish the adapter, stream events.

One asyncio task per live job drives it from QUEUED to a terminal state; every change is a
job-row update plus an event in one SQLite transaction, so `WatchJob` can replay a job's whole
history and a restarted gateway finds its unfinished jobs and runs them again (`start()`; LoRA jobs
continue from their checkpoint, see TRAINING.md).
Publishing is the commit point: a cancel that arrives while the adapter is being written
waits for it and returns the SUCCEEDED job, so a cancelled job never leaves a version behind.

Jobs are owned through leases in the database (store.py): the replica that runs a job renews
its lease every third of `lease_seconds`, and every write it makes for the job is fenced by it. On a
database several control replicas share (PostgreSQL), a replica that finds a job whose owner stopped
renewing takes it over and resumes it from its checkpoint on shared storage; a replica that finds
its own lease gone stops driving that job at once, writing nothing more for it. No job is driven by
two replicas at once, and publishing is idempotent by job (the adapter store returns the version a
job already published), so no version is published twice.

Every database call runs on the database's own thread (`Database.run`): a lock held by another
process, or a slow disk, never stalls the event loop. Whatever ends a job's driving task (a
failure, a cancel, its time limit, the database refusing an event) also cancels its Ray task, and
the job always reaches a terminal state that readers and watchers see: in the database when it
can be written, else kept in memory (and written by a later write that succeeds).
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptgate.errors import AdaptgateError, JobNotFound, Unavailable
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.records import EVENT_KINDS, JobEvent, JobRecord, JobSpec, JobState, Publish, PublishRequest
from adaptgate.training.jobs.signals import JobSignals
from adaptgate.training.jobs.store import JobStore, LeaseLost
from adaptgate.training.jobs.validation import check_method, check_out_of_scope_label, check_validation_labels, normalized_spec
from adaptgate.training.methods.auto import AUTO, choose_method
from adaptgate.training.methods.evaluation import describe_confusion
from adaptgate.training.methods.method import Context, TrainParams, TrainResult
from adaptgate.training.methods.registry import method_named
from adaptgate.training.runners.base import Runner, TrainingFailed, internal_error
from adaptgate.training.runners.updates import Update
from adaptgate.training.tracking import TrackingConfig, TrackingSpec, close_job_run, open_job_run

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 10.0
WATCH_SAFETY_WAKE_S = 5.0
RESUMED = "resumed after gateway restart"
TAKEN_OVER = "taken over by replica {owner}: the replica that ran it stopped renewing its lease"
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    """How a job ends: its terminal state, the message of its last event, and its `error`."""

    state: JobState
    message: str
    error: str = ""
    details: dict[str, object] = field(default_factory=dict)


CANCELLED = Outcome(JobState.CANCELLED, "cancelled")
# The last event a watcher is shown when the log lacks one (the database refused to store it).
CLOSING_MESSAGES: dict[JobState, Callable[[JobRecord], str]] = {
    JobState.SUCCEEDED: lambda r: f"published {r.adapter_ref}",
    JobState.FAILED: lambda r: f"failed: {r.error}",
    JobState.CANCELLED: lambda r: "cancelled",
}


@dataclass
class _Run:
    """The live part of a job in this process."""

    task: asyncio.Task[None] | None = None
    stop: Outcome | None = None  # why the task was cancelled (a tenant's cancel, the time limit); None: shutdown
    committing: bool = False  # publishing or writing the end: cancels and the time limit wait for it
    abandoned: bool = False  # another replica owns the job now: stop without writing anything for it


def failure_message(exc: Exception) -> str:
    """The job's `error`: our own errors' sentences; anything unexpected as a sentence and an error id."""
    if isinstance(exc, AdaptgateError):
        return exc.message
    if isinstance(exc, TrainingFailed):
        return str(exc)
    return internal_error("the job failed with an internal error", exc)


def training_params(record: JobRecord, limits: JobLimits = JobLimits(), base_fingerprint: str = "") -> TrainParams:
    """The runner's parameters for a job record (the record keeps what the tenant asked for; 0 = defaults),
    built by the record's method within this server's limits; `base_fingerprint` is the gateway's base
    model, which the worker checks its own against."""
    return method_named(record.method).params_for(record.spec, Context(limits, base_fingerprint))


def job_tags(record: JobRecord) -> dict[str, str]:
    """How a job's MLflow run is found: by tenant, job, dataset and adapter (its version is added when published)."""
    return {
        "tenant": record.tenant, "job_id": record.id, "dataset_id": record.dataset_id, "adapter_name": record.adapter_name,
        "alias": record.alias, "method": record.method,
    }


def job_params(record: JobRecord) -> dict[str, object]:
    """What the gateway decided for the job; the worker logs the training hyperparameters themselves."""
    chosen = record.details.get("method") or {}
    reason = chosen.get("reason") or f"method {record.method!r} asked for by name"
    return {"method": record.method, "auto": record.auto, "method_reason": reason, "max_seconds": record.max_seconds}


def result_files(record: JobRecord, result: TrainResult) -> dict[str, bytes]:
    """The adapter directory a finished job publishes, as its method writes it; refuses non-finite weights."""
    if not all(torch.isfinite(t).all() for t in result.tensors()):
        raise TrainingFailed("training diverged: the trained weights are not finite")
    return method_named(record.method).files(result, f"job:{record.id}")


class JobManager:
    def __init__(
        self, db: Database, datasets: DatasetStore, runner: Runner, publish: Publish, model_dir: Path,
        limits: JobLimits = JobLimits(), sleep: Sleep = asyncio.sleep, *, base_fingerprint: str = "",
        owner: str = "", lease_seconds: float = 30.0, tracking: TrackingConfig = TrackingConfig(),
    ) -> None:
        """`sleep` is the clock the time limits wait on (tests pass one they control); `base_fingerprint`
        is the base model at `model_dir` as the gateway loaded it, which workers check theirs against;
        `owner` names this replica in the jobs' leases; `tracking` is where jobs log their MLflow runs (tracking.py)."""
        self._db = db
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._store = JobStore(db, owner, lease_seconds)
        self._datasets = datasets
        self._runner = runner
        self._publish = publish
        self._model_dir = Path(model_dir)
        self._base_fingerprint = base_fingerprint
        self._limits = limits
        self._sleep = sleep
        self._tracking = tracking
        self._signals = JobSignals()
        self._runs: dict[str, _Run] = {}
        self._unsaved: dict[str, JobRecord] = {}  # ended jobs whose terminal state the database refused
        self._closed = False
        self._leases: asyncio.Task[None] | None = None

    # ----- public API -------------------------------------------------------------------------

    async def start(self) -> None:
        """Runs again the jobs a previous gateway process left QUEUED or RUNNING (on a private SQLite
        file every one of them; on a shared database those whose owner's lease has expired), then
        keeps this replica's leases renewed and takes over the jobs of replicas that die."""
        await self._take_over(expired_only=self._db.shared, note=RESUMED)
        self._leases = asyncio.create_task(self._keep_leases(), name="adaptgate job leases")

    async def submit(self, tenant: str, spec: JobSpec) -> JobRecord:
        if self._closed:
            raise Unavailable("the gateway is shutting down; submit the job again shortly")
        resolved = normalized_spec(spec, self._limits)
        dataset = await self._db.run(self._datasets.get, tenant, resolved.dataset_id)
        if resolved.validation_dataset_id:
            validation = await self._db.run(self._datasets.get, tenant, resolved.validation_dataset_id)
            check_validation_labels(dataset, validation)
        check_out_of_scope_label(resolved, dataset)
        note = ""
        if resolved.method == AUTO:
            method, note = choose_method(dataset.rows, len(dataset.label_counts), bool(resolved.out_of_scope_label))
            resolved = dataclasses.replace(resolved, method=method, auto=True)
            check_method(resolved, self._limits)
        record = JobRecord.new(tenant, resolved)
        events = [self._event(record, "state", f"queued: {resolved.method} on dataset {dataset.id}")]
        if note:
            record.details["method"] = {"chosen": resolved.method, "reason": note}
            events.append(self._event(record, "log", note, details={"method": record.details["method"]}))
        await self._save_unsaved()
        admit = functools.partial(self._limits.check_room, tenant)
        await self._db.run(functools.partial(self._store.insert, record, *events, admit=admit))
        self._launch(record)
        return dataclasses.replace(record)  # the running task keeps mutating its own copy

    async def get(self, tenant: str | None, job_id: str) -> JobRecord:
        return await self._owned(tenant, job_id)

    async def list(self, tenant: str | None) -> builtins.list[JobRecord]:
        records = await self._db.run(self._store.list_jobs, tenant)
        return [dataclasses.replace(self._unsaved.get(r.id, r)) for r in records]

    async def cancel(self, tenant: str | None, job_id: str) -> JobRecord:
        """CANCELLED within seconds and nothing published; a terminal job is returned unchanged."""
        record = await self._owned(tenant, job_id)
        if record.state.terminal:
            return record
        run = self._runs.get(job_id)
        if run is None or run.task is None:
            await self._cancel_elsewhere(record)
            return await self._owned(None, job_id)
        if not run.committing and run.stop is None:
            run.stop = CANCELLED
            run.task.cancel()
        await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)
        return await self._owned(None, job_id)

    async def watch(self, tenant: str | None, job_id: str) -> AsyncIterator[JobEvent]:
        """Every event from seq 1, then live ones, until a terminal state event: always one, even when
        the database could not store it (then it is made from the job's record)."""
        await self._owned(tenant, job_id)
        seq = 0
        while True:
            change = self._signals.listen(job_id)
            record = await self._owned(None, job_id)  # before the events: a terminal row has its event already
            events = await self._db.run(self._store.events_after, job_id, seq)
            for event in events:
                yield event
                seq = event.seq
                if event.final:
                    return
            if events:
                continue
            if record.state.terminal:
                yield self._closing_event(record, seq)
                return
            if self._closed:
                raise Unavailable("the gateway is shutting down; watch the job again once it is back")
            await self._signals.wait(change, WATCH_SAFETY_WAKE_S)

    def driving(self) -> builtins.list[str]:
        """The jobs this replica runs now (each under its lease)."""
        return builtins.list(self._runs)

    def counts_by_state(self) -> dict[str, int]:
        """Jobs per state (read by the metrics thread), counting unsaved endings as what they are."""
        counts = self._store.counts_by_state()
        for record in builtins.list(self._unsaved.values()):
            stored = self._store.get(record.id)
            if stored is not None and stored.state is not record.state:
                counts[stored.state.value] -= 1
                counts[record.state.value] += 1
        return counts

    async def close(self) -> None:
        """Stops driving jobs without marking them: the next `start()` runs them again."""
        self._closed = True
        self._signals.notify_all()
        if self._leases is not None:
            self._leases.cancel()
        owned = builtins.list(self._runs)
        for job_id, run in list(self._runs.items()):
            if not run.committing and run.task is not None:
                self._runner.cancel(job_id)
                run.task.cancel()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._save_unsaved()
        await self._release(owned)

    async def _release(self, job_ids: builtins.list[str]) -> None:
        """Hands the leases of the jobs this replica stopped driving to whichever replica is next."""
        if not job_ids:
            return
        try:
            await self._db.run(self._store.release, job_ids)
        except Exception:  # noqa: BLE001 - the leases then expire on their own
            log.warning("could not release the leases of %d job(s)", len(job_ids), exc_info=True)

    # ----- leases -----------------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renews this replica's leases and, on a shared database, takes over jobs whose owner died.
        A database that cannot be reached costs one round: the leases may lapse, and the fenced
        writes then stop this replica's runs of those jobs."""
        while not self._closed:
            await asyncio.sleep(self._lease_seconds / 3)
            try:
                await self._renew()
                if self._db.shared:
                    await self._take_over(expired_only=True, note=TAKEN_OVER.format(owner=self._owner))
            except Exception:  # noqa: BLE001 - the next round tries again
                log.warning("could not renew or take over job leases", exc_info=True)

    async def _renew(self) -> None:
        running = builtins.list(self._runs)
        if not running:
            return
        held = await self._db.run(self._store.renew, running)
        for job_id in set(running) - held:
            self._abandon(job_id)

    async def _take_over(self, *, expired_only: bool, note: str) -> None:
        if self._closed:
            return
        claim = functools.partial(self._store.claim, None, expired_only=expired_only)
        for record in await self._db.run(claim):
            if record.id not in self._runs:
                record.state, record.progress = JobState.QUEUED, 0.0
                self._launch(record, note)

    def _abandon(self, job_id: str) -> None:
        """Another replica owns the job now (or it was ended there): stop driving it, write nothing."""
        run = self._runs.get(job_id)
        if run is None or run.task is None or run.abandoned:
            return
        log.warning("job %s is no longer leased to replica %s; stopping its run here", job_id, self._owner)
        run.abandoned = True
        self._runner.cancel(job_id)
        run.task.cancel()

    # ----- lookups ----------------------------------------------------------------------------

    async def _owned(self, tenant: str | None, job_id: str) -> JobRecord:
        """Another tenant's job is 'not found', exactly like a missing one."""
        record = self._unsaved.get(job_id) or await self._db.run(self._store.get, job_id)
        if record is None or (tenant is not None and record.tenant != tenant):
            raise JobNotFound(f"job {job_id!r} not found")
        return dataclasses.replace(record)

    @staticmethod
    def _closing_event(record: JobRecord, seq: int) -> JobEvent:
        message = CLOSING_MESSAGES[record.state](record)
        return JobEvent(
            record.id, seq + 1, record.updated_at, record.state, "state", message, record.progress, dict(record.metrics)
        )

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

    async def _emit(
        self, record: JobRecord, kind: str, message: str, metrics: dict[str, float] | None = None, eta: float = 0.0,
        details: dict[str, object] | None = None,
    ) -> JobEvent:
        event = await self._db.run(self._store.save, record, self._event(record, kind, message, metrics, eta, details))
        self._signals.notify(record.id)
        return event

    async def _set_state(self, record: JobRecord, state: JobState, message: str) -> None:
        record.state = state
        await self._emit(record, "state", message, record.metrics)

    async def _finish(self, record: JobRecord, outcome: Outcome) -> None:
        """Writes the terminal state. When the database refuses it the job still ends: the row alone is
        tried (the smallest write), else the ending is kept in memory for readers and watchers, and a
        later write saves it (`_save_unsaved`)."""
        record.state, record.error = outcome.state, outcome.error
        event = self._event(record, "state", outcome.message, record.metrics, details=outcome.details)
        try:
            await asyncio.shield(self._db.run(self._store.save, record, event))
        except LeaseLost as exc:  # another replica owns the job: its ending is that replica's to write
            log.warning("job %s: %s; its ending here (%s) is not written", record.id, exc.message, outcome.state.value)
            return
        except Exception as exc:  # noqa: BLE001 - the job ends either way; the reason goes to the log
            log.error("job %s ended %s but its final event could not be saved: %s", record.id, outcome.state.value, exc)
            try:
                await asyncio.shield(self._db.run(self._store.save_row, record))
            except Exception:  # noqa: BLE001 - kept in memory instead
                self._unsaved[record.id] = record
        self._signals.notify(record.id)
        await self._close_tracking(record)

    async def _cancel_elsewhere(self, record: JobRecord) -> None:
        """A job this replica does not drive (another replica's, or one not started yet) is ended in
        the database; its owner's next write or lease renewal finds it ended and stops its run."""
        record.state, record.error = CANCELLED.state, ""
        event = self._event(record, "state", CANCELLED.message, record.metrics)
        if await self._db.run(self._store.cancel, record, event):
            self._signals.notify(record.id)
            self._discard(record.id)
            await self._close_tracking(record)

    async def _save_unsaved(self) -> None:
        for job_id, record in builtins.list(self._unsaved.items()):
            try:
                await self._db.run(self._store.save_row, record)
            except Exception:  # noqa: BLE001 - still refused: the next write tries again
                return
            self._unsaved.pop(job_id, None)

    # ----- running a job ----------------------------------------------------------------------

    def _launch(self, record: JobRecord, note: str = "") -> None:
        run = _Run()
        self._runs[record.id] = run
        run.task = asyncio.create_task(self._execute(record, run, note), name=f"adaptgate {record.id}")

    async def _execute(self, record: JobRecord, run: _Run, note: str) -> None:
        limit = self._limits.time_limit(record.max_seconds)
        timer = asyncio.create_task(self._expire(run, limit), name=f"adaptgate {record.id} time limit")
        try:
            outcome = await self._drive(record, run, note)
            if outcome.state is not JobState.SUCCEEDED:
                self._runner.cancel(record.id)  # whatever ended the job ends its Ray task too
            await self._finish(record, outcome)
        except LeaseLost as exc:
            log.warning("job %s: %s; stopping its run here", record.id, exc.message)
            self._runner.cancel(record.id)
        except asyncio.CancelledError:
            if not run.abandoned:
                raise
        finally:
            timer.cancel()
            self._runs.pop(record.id, None)
            if record.state.terminal:
                self._discard(record.id)

    async def _drive(self, record: JobRecord, run: _Run, note: str) -> Outcome:
        """Runs the job to its outcome. A gateway shutdown (a cancel without `run.stop`) propagates:
        the record stays unfinished and the next gateway resumes it."""
        try:
            if note:
                await self._emit(record, "log", note)
            await self._open_tracking(record)
            result = await self._train(record, run)
            run.committing = True
            ref = await self._publish_result(record, result)
        except asyncio.CancelledError:
            if run.stop is None or run.abandoned:
                raise
            run.committing = True
            return run.stop
        except LeaseLost:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's FAILED reason
            run.committing = True
            if run.stop is not None:
                return run.stop
            reason = failure_message(exc)
            return Outcome(JobState.FAILED, f"failed: {reason}", reason)
        return self._success(record, result, ref)

    async def _expire(self, run: _Run, seconds: int) -> None:
        """The job's wall-clock limit: past it, the job fails and its Ray task is cancelled."""
        await self._sleep(seconds)
        if run.committing or run.stop is not None or run.task is None:
            return
        reason = f"the job exceeded its time limit of {seconds} s; ask for fewer epochs or steps, or a larger max_seconds"
        run.stop = Outcome(JobState.FAILED, f"failed: {reason}", reason)
        run.task.cancel()

    def _discard(self, job_id: str) -> None:
        discard = getattr(self._runner, "discard", None)
        if discard is None:
            return
        try:
            discard(job_id)
        except Exception:  # noqa: BLE001 - a leftover checkpoint directory is harmless
            log.warning("could not remove the checkpoints of job %s", job_id, exc_info=True)

    async def _train(self, record: JobRecord, run: _Run) -> TrainResult:
        dataset = await self._db.run(self._datasets.get, None, record.dataset_id)
        texts, labels = await asyncio.to_thread(self._datasets.load, dataset)
        params = training_params(record, self._limits, self._base_fingerprint)
        if record.validation_dataset_id:  # its rows go after the training rows, and are the validation split
            validation = await self._db.run(self._datasets.get, None, record.validation_dataset_id)
            held_texts, held_labels = await asyncio.to_thread(self._datasets.load, validation)
            params = dataclasses.replace(params, holdout_from=len(texts))
            texts, labels = texts + held_texts, labels + held_labels
        if run_id := str(record.details.get("tracking", {}).get("run_id", "")):
            params = dataclasses.replace(params, tracking=TrackingSpec(self._tracking.uri, run_id))
        on_event = functools.partial(self._on_update, record, run)
        return await self._runner.run(record.id, texts, labels, str(self._model_dir), params, on_event)

    async def _open_tracking(self, record: JobRecord) -> None:
        """Opens the job's MLflow run once and stores its id in the record before training starts, so a
        resumed or taken-over job, and every Ray attempt, logs into the same run. Without a server no run."""
        if not self._tracking.enabled or record.details.get("tracking"):
            return
        run_id = await asyncio.to_thread(open_job_run, self._tracking, record.id, job_tags(record), job_params(record))
        if run_id:
            record.details["tracking"] = {"run_id": run_id, "experiment": self._tracking.experiment}
            await self._emit(record, "log", f"tracking to MLflow run {run_id} in experiment {self._tracking.experiment!r}")

    async def _close_tracking(self, record: JobRecord) -> None:
        """Ends a finished job's MLflow run with its outcome and published adapter (best effort, off the loop)."""
        run_id = str(record.details.get("tracking", {}).get("run_id", ""))
        if self._tracking.enabled and run_id and record.state.terminal:
            state, ref, error = record.state.value, record.adapter_ref, record.error
            await asyncio.to_thread(close_job_run, self._tracking, run_id, state, ref, error)

    async def _on_update(self, record: JobRecord, run: _Run, update: Update) -> None:
        """A runner update becomes an event; the first one moves the job to RUNNING."""
        if record.state.terminal or run.stop is not None or run.abandoned:
            return
        kind, message = str(update.get("kind", "log")), str(update.get("message", ""))
        if kind == "skip":
            return
        if record.state is JobState.QUEUED:
            await self._set_state(record, JobState.RUNNING, message if kind == "started" else "running")
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
        await self._emit(record, event_kind, message, metrics, float(update.get("eta_seconds", 0.0)), details)

    async def _publish_result(self, record: JobRecord, result: TrainResult) -> str:
        """Publishes only while this replica still holds the job; a replica that takes it over later
        and trains it again gets the same version back (the adapter store knows the job's source)."""
        files = result_files(record, result)
        if record.id not in await self._db.run(self._store.renew, [record.id]):
            raise LeaseLost(f"job {record.id} is no longer leased to replica {self._owner!r}; it publishes elsewhere")
        request = PublishRequest(record.tenant, record.adapter_name, files, record.alias, f"job:{record.id}")
        return await asyncio.to_thread(self._publish, request)

    @staticmethod
    def _success(record: JobRecord, result: TrainResult, ref: str) -> Outcome:
        record.adapter_ref, record.metrics, record.progress = ref, dict(result.metrics), 1.0
        alias = f" and moved alias {record.alias!r}" if record.alias else ""
        summary = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
        details: dict[str, object] = {}
        confusion = ""
        if result.confusion:
            details["confusion"] = record.details["confusion"] = {"labels": result.labels, "matrix": result.confusion}
            if text := describe_confusion(result.labels, result.confusion):
                confusion = f"; {text}"
        return Outcome(JobState.SUCCEEDED, f"published {ref}{alias} (validation {summary}){confusion}", details=details)
