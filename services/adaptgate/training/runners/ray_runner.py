"""Run training as Ray tasks: local Ray by default, a cluster (KubeRay) when an address is given.

Each job is one Ray *generator* task: it yields training updates as they happen and the
result last, so progress streams back without an extra queue actor. Ray retries the task
when its worker dies (max_retries) and keeps only the stream items whose index it has not
seen yet, so a retried attempt must line its stream up with the first one:
- jobs of methods that are not `resumable` (`head`) restart from scratch (they take seconds) and
  yield the same number of updates on every attempt, so the retry's first items are exactly the
  ones already delivered.
- `resumable` ones (`lora`, `embed`; methods/method.py) resume from their last checkpoint
  (`<checkpoint_root>/<job id>/`, on shared storage every worker reaches: the attempt that resumes
  may run on another node), so they yield fewer updates than a fresh run. Their journal records
  how many items the stream has carried; a resumed attempt first yields that many "skip"
  placeholders (Ray drops those it already has, the caller drops the rest) and then its real
  updates, so none of them, nor the result, lands on an index Ray already filled.
Why task retries and not Ray Train: a job is one process on one CPU slot; Ray Train's
FailureConfig restarts a whole worker group with a TorchTrainer and its own storage layer,
which costs seconds per job and a second checkpoint format for no gain at this size.
Ray is imported lazily so the engine and the server import fine where Ray is not installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from adaptgate.storage import Storage
from adaptgate.training.methods.method import TrainParams, TrainResult
from adaptgate.training.methods.registry import method_of
from adaptgate.training.runners.base import OnEvent, TrainingFailed, internal_error
from adaptgate.training.runners.checkpoints import CheckpointDir
from adaptgate.training.runners.updates import Update, make_update

log = logging.getLogger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024
TASK_RETRIES = 2
_DONE = object()
SKIP: Update = {"kind": "skip"}
# A local Ray shares the gateway's machine: under load its raylet answers health checks late, and a
# raylet declared dead ends the driver (the gateway) with it; be patient (about 2.5 minutes, not 15 s).
LOCAL_HEALTH_CHECKS = {
    "health_check_failure_threshold": 20, "health_check_period_ms": 5000, "health_check_timeout_ms": 30000,
}


def _train_in_thread(args: tuple[Any, ...], updates: queue.Queue[Any]) -> None:
    """Runs the job's method, putting each update, then the result (or the exception), on `updates`."""
    from adaptgate.training.methods.train import train

    try:
        updates.put({"kind": "result", "result": train(*args, updates.put)})
    except BaseException as exc:  # noqa: BLE001 - handed to the generator, which re-raises it
        updates.put(exc)
    updates.put(_DONE)


def train_task(texts: list[str], labels: list[str], model_dir: str, params: TrainParams, threads: int) -> Iterator[Update]:
    """The Ray task body: training runs in a thread while this generator yields its updates."""
    import torch

    torch.set_num_threads(threads)
    directory = getattr(params, "checkpoint_dir", "")
    journal = CheckpointDir(directory) if directory else None
    sent = journal.journal() if journal else 0
    for _ in range(sent):
        yield SKIP
    updates: queue.Queue[Any] = queue.Queue()
    worker = threading.Thread(target=_train_in_thread, args=((texts, labels, model_dir, params), updates), daemon=True)
    worker.start()
    again = "; an earlier attempt stopped, continuing from its checkpoint" if sent else ""
    started = make_update("started", f"running on Ray worker pid {os.getpid()} with {threads} thread(s){again}", 0.0)
    item: Any = {**started, "worker_pid": os.getpid()}
    while item is not _DONE:
        if isinstance(item, BaseException):
            raise item
        if journal is not None:  # counted before it leaves: a lost item costs one event, never the result
            sent += 1
            journal.set_journal(sent)
        yield item
        item = updates.get()
    worker.join()


def failure_reason(exc: BaseException) -> str:
    """A sentence for the job's `error`. Only errors written for tenants (divergence, a dataset that
    cannot train) are shown as they are; anything else is an internal error: a sentence and an error
    id, with the exception (paths, library internals) in the server log."""
    from ray.exceptions import RayTaskError, TaskCancelledError, WorkerCrashedError

    from adaptgate.errors import AdaptgateError
    from adaptgate.training.methods.head_fit import TrainingDiverged

    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, (TrainingDiverged, AdaptgateError)):
            return str(cause)
        return internal_error("the training task failed with an internal error", cause or exc)
    if isinstance(exc, TaskCancelledError):
        return "the training task was cancelled on Ray"
    if isinstance(exc, WorkerCrashedError):
        return f"the Ray worker running the job died {TASK_RETRIES + 1} times (killed or out of memory)"
    return internal_error("Ray could not run the job", exc)


class RayRunner:
    """Starts (or joins) Ray on first use and runs each job as one retried generator task.

    A local Ray is started by the first job, not with the gateway: an idle local Ray (GCS, raylet,
    agents, two idle workers: 9 processes) holds about 650 MiB and 4.5% of a core, which
    serving-only replicas would pay for nothing, and made the gateway's start 8.4 s instead of
    5.1. The first job waits out `ray.init` (about 3 s) instead.
    """

    def __init__(
        self, address: str | None, num_cpus: int = 0, task_cpus: float = 1.0, *, checkpoint_root: str | os.PathLike[str],
        task_gpus: float = 0.0, task_resources: dict[str, float] | None = None,
    ) -> None:
        """checkpoint_root: a directory or fsspec URI every Ray worker reaches (storage.py); never a node's own disk.
        task_gpus > 0 makes each job reserve that share of a GPU; its worker then trains on CUDA (device "auto").
        task_resources: Ray custom resources each job reserves on a cluster, which pins jobs to the workers
        offering them (a local Ray is one node: there they are not asked for)."""
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = num_cpus
        self.task_cpus = task_cpus
        self.task_gpus = task_gpus
        self.task_resources = dict(task_resources or {})
        self.checkpoints = Storage(checkpoint_root)
        self.init_seconds = 0.0
        self._remote: Any = None
        self._owns_ray = False
        self._lock = threading.Lock()
        self._active: dict[str, Any] = {}  # job id -> ObjectRefGenerator

    def _init_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "address": self.address, "ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False,
        }
        if self.address is None:  # a local Ray: keep its footprint small next to the gateway
            args.update(
                num_cpus=self.num_cpus or None, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                _system_config=dict(LOCAL_HEALTH_CHECKS),
            )
        return args

    def _task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.task_cpus, "num_gpus": self.task_gpus, "max_retries": TASK_RETRIES}
        if self.task_resources and self.address is not None:
            options["resources"] = self.task_resources
        return options

    def start(self) -> None:
        """Idempotent and blocking (seconds): call it at startup or via asyncio.to_thread."""
        with self._lock:
            if self._remote is not None:
                return
            import ray

            self._owns_ray = not ray.is_initialized()
            began = time.monotonic()
            ray.init(**self._init_args())
            self.init_seconds = time.monotonic() - began
            self._remote = ray.remote(train_task).options(**self._task_options())
            log.info("Ray ready in %.1f s (%s)", self.init_seconds, self.address or "local")

    def checkpoint_dir(self, job_id: str) -> Storage:
        return self.checkpoints.child(job_id)

    async def run(
        self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: TrainParams, on_event: OnEvent
    ) -> TrainResult:
        try:
            await asyncio.to_thread(self.start)
        except Exception as exc:  # noqa: BLE001 - ray.init raises several types; each fails this job, not the gateway
            raise TrainingFailed(internal_error(f"could not start Ray ({self.address or 'local'})", exc)) from None
        if method_of(params).resumable and not getattr(params, "checkpoint_dir", ""):
            params = dataclasses.replace(params, checkpoint_dir=self.checkpoint_dir(job_id).uri)  # type: ignore[type-var]
        stream = self._submit(texts, labels, model_dir, params)
        self._active[job_id] = stream
        try:
            return await self._drain(stream, on_event)
        except BaseException:
            # Cancelled, or on_event failed (a full disk): the worker must not train on. Once per task: cancel()
            # takes the stream out of _active, as each extra cancel is one more race with Ray's task bookkeeping,
            # whose failed checks abort the driver (the gateway).
            if self._active.get(job_id) is stream:
                self._cancel_stream(stream)
            raise
        finally:
            self._active.pop(job_id, None)

    def _submit(self, texts: list[str], labels: list[str], model_dir: str, params: TrainParams) -> Any:
        from ray.exceptions import RayError

        try:
            return self._remote.remote(texts, labels, model_dir, params, max(1, int(self.task_cpus)))
        except RayError as exc:
            raise TrainingFailed(failure_reason(exc)) from None

    @staticmethod
    async def _drain(stream: Any, on_event: OnEvent) -> TrainResult:
        from ray.exceptions import RayError

        try:
            async for ref in stream:
                item = await ref
                kind = item.get("kind")
                if kind == "result":
                    return item["result"]
                if kind != "skip":
                    await on_event(item)
        except RayError as exc:
            raise TrainingFailed(failure_reason(exc)) from None
        raise TrainingFailed("the training task ended without a result")

    def discard(self, job_id: str) -> None:
        self.checkpoint_dir(job_id).remove_tree()

    def cancel(self, job_id: str) -> None:
        stream = self._active.pop(job_id, None)
        if stream is not None:
            self._cancel_stream(stream)

    @staticmethod
    def _cancel_stream(stream: Any) -> None:
        """force=True kills the worker process: torch ops do not check for interruption."""
        import ray

        try:
            ray.cancel(stream, force=True)
        except Exception:  # noqa: BLE001 - finished or already cancelled
            log.debug("ray.cancel failed", exc_info=True)

    def stop(self) -> None:
        for job_id in list(self._active):
            self.cancel(job_id)
        with self._lock:
            if self._remote is not None and self._owns_ray:
                import ray

                ray.shutdown()
            self._remote = None
