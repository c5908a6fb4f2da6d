"""Experiment tracking against a real `mlflow server` (tests/mlflow_server.py): real head jobs on the tiny model,
read back through MlflowClient; a resumed job continues its run; a dead server never fails a job."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.jobs.records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.training.methods.head import HeadParams
from adaptgate.training.methods.lora import LoraParams
from adaptgate.training.methods.method import TrainParams, TrainResult
from adaptgate.training.methods.train import train
from adaptgate.training.runners.base import TrainingFailed
from adaptgate.training.runners.base import OnEvent
from adaptgate.training.runners.ray_runner import RayRunner
from adaptgate.training.runners.updates import Update
from adaptgate.training.tracking import CONFUSION_CSV, CONFUSION_JSON, MlflowTracker, TrackingConfig, TrackingSpec, confusion_csv, open_job_run
from tests.mlflow_server import free_port, mlflow_server  # noqa: F401 - the session fixture

from .conftest import jsonl, separable_rows
from .fakes import FakePublisher, FakeRunner

HEAD_STEPS = 100  # HeadParams evaluates every 25 steps: 4 evaluations


@dataclass
class LocalRunner:
    """Runs `methods.train` in a thread of this process, as the Ray task body does on a worker."""

    params: list[TrainParams] = field(default_factory=list)

    async def run(
        self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: TrainParams, on_event: OnEvent
    ) -> TrainResult:
        self.params.append(params)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()

        def report(update: Update) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, update)

        work = asyncio.ensure_future(asyncio.to_thread(train, texts, labels, model_dir, params, report))
        while not work.done():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                await on_event(getter.result())
            else:
                getter.cancel()
        while not updates.empty():
            await on_event(updates.get_nowait())
        return work.result()

    def cancel(self, job_id: str) -> None:
        return None


class Jobs:
    """A job manager over a temp database, one 60-row dataset for 'acme', and the tiny model."""

    def __init__(self, root: Path, model_dir: Path, runner: Any, tracking: TrackingConfig) -> None:
        self.db = Database(root / "jobs.db")
        self.datasets = DatasetStore(root / "datasets", self.db)
        existing = [d.id for d in self.datasets.list("acme")]
        self.dataset = existing[0] if existing else self.datasets.create("acme", "d", "jsonl", jsonl(separable_rows(30))).id
        self.publisher = FakePublisher()
        self.runner = runner
        self.manager = JobManager(self.db, self.datasets, runner, self.publisher, model_dir, tracking=tracking)

    def spec(self, **kw: Any) -> JobSpec:
        return JobSpec(**{"dataset_id": self.dataset, "adapter_name": "spam", "epochs": HEAD_STEPS, **kw})

    async def events(self, job_id: str) -> list[JobEvent]:
        async def collect() -> list[JobEvent]:
            return [e async for e in self.manager.watch("acme", job_id)]

        return await asyncio.wait_for(collect(), timeout=60)


def client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def run_id_of(record: JobRecord) -> str:
    return str(record.details["tracking"]["run_id"])


async def test_a_head_job_logs_its_run_from_where_it_trains(
    mlflow_server: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    jobs = Jobs(tmp_path, tiny_model_dir, LocalRunner(), TrackingConfig(mlflow_server))  # the default experiment
    job = await jobs.manager.submit("acme", jobs.spec(method="auto", seed=7))
    events = await jobs.events(job.id)
    assert events[-1].state is JobState.SUCCEEDED, events[-1].message
    record = await jobs.manager.get("acme", job.id)
    await jobs.manager.close()
    mlflow = client(mlflow_server)
    run = mlflow.get_run(run_id_of(record))

    assert mlflow.get_experiment(run.info.experiment_id).name == "adaptgate"
    assert run.info.status == "FINISHED" and run.info.run_name == job.id
    tags = run.data.tags
    assert (tags["tenant"], tags["job_id"], tags["adapter_ref"]) == ("acme", job.id, record.adapter_ref)
    assert tags["adapter_version"] == record.adapter_ref.rsplit("@v", 1)[1] and tags["state"] == "SUCCEEDED"
    params = run.data.params
    assert (params["method"], params["auto"], params["params_class"]) == ("head", "True", "HeadParams")
    assert params["method_reason"] == record.details["method"]["reason"] and "chose 'head'" in params["method_reason"]
    asked = (params["seed"], params["epochs"], params["effective_steps"], params["rows"])
    assert asked == ("7", str(HEAD_STEPS), str(HEAD_STEPS), "60")
    assert {"learning_rate", "effective_learning_rate", "validation_fraction", "weight_decay", "batch_size"} <= set(params)
    assert "tracking" not in params and "base_fingerprint" not in params

    evals = [e for e in events if e.kind == "eval"]
    history = sorted(mlflow.get_metric_history(run.info.run_id, "accuracy"), key=lambda m: m.step)
    assert [m.step for m in history] == [25, 50, 75, 100]
    assert [m.value for m in history] == pytest.approx([e.metrics["accuracy"] for e in evals])
    assert run.data.metrics["final_accuracy"] == pytest.approx(record.metrics["accuracy"])

    confusion = record.details["confusion"]
    local = Path(mlflow.download_artifacts(run.info.run_id, CONFUSION_JSON, str(tmp_path)))
    assert json.loads(local.read_text())["matrix"] == confusion["matrix"]
    csv_text = Path(mlflow.download_artifacts(run.info.run_id, CONFUSION_CSV, str(tmp_path))).read_text()
    assert csv_text == confusion_csv(confusion["labels"], confusion["matrix"])
    adapter = json.loads(Path(mlflow.download_artifacts(run.info.run_id, "adapter.json", str(tmp_path))).read_text())
    assert adapter["adapter"] == record.adapter_ref


def test_a_lora_auto_run_logs_per_block_learning_rates_at_their_steps(
    mlflow_server: str, tiny_model_dir: Path
) -> None:
    run_id = open_job_run(TrackingConfig(mlflow_server, "lora-blocks"), "job-lora", {"tenant": "acme"}, {"method": "lora"})
    rows = separable_rows(40)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    params = LoraParams(
        dtype="float32", device="cpu", learning_rate=1e-2, batch_size=16, max_tokens=32, auto=True, max_steps=12,
        eval_every=4, seed=2, tracking=TrackingSpec(mlflow_server, run_id),
    )
    updates: list[Update] = []
    result = train(texts, labels, str(tiny_model_dir), params, updates.append)
    mlflow = client(mlflow_server)
    tables = [u for u in updates if "blocks" in u.get("details", {})]
    assert len(tables) >= 2  # one per epoch started
    for block in (0, 1):
        history = sorted(mlflow.get_metric_history(run_id, f"lr_block_{block}"), key=lambda m: m.step)
        assert [m.step for m in history] == [t["step"] for t in tables]
        expected = [next(r["learning_rate"] for r in t["details"]["blocks"] if r["block"] == block) for t in tables]
        assert [m.value for m in history] == pytest.approx(expected)
    evals = [u for u in updates if u["kind"] == "eval" and "confusion" not in u.get("details", {})]
    assert [m.step for m in mlflow.get_metric_history(run_id, "macro_f1")] == [u["step"] for u in evals]
    run = mlflow.get_run(run_id)
    assert (run.data.params["params_class"], run.data.params["rank"], run.data.params["auto"]) == ("LoraParams", "0", "True")
    assert run.data.metrics["final_macro_f1"] == pytest.approx(result.metrics["macro_f1"])
    assert CONFUSION_JSON in {a.path for a in mlflow.list_artifacts(run_id)}


@pytest.mark.integration
async def test_a_ray_worker_logs_into_the_run_the_gateway_opened(
    mlflow_server: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    run_id = open_job_run(TrackingConfig(mlflow_server, "ray"), "job-ray", {"tenant": "acme"}, {"method": "head"})
    rows = separable_rows(30)
    params = HeadParams(seed=0, epochs=50, eval_every=25, tracking=TrackingSpec(mlflow_server, run_id))
    runner = RayRunner(None, num_cpus=1, task_cpus=1.0, checkpoint_root=tmp_path / "checkpoints")
    updates: list[Update] = []

    async def collect(update: Update) -> None:
        updates.append(update)

    try:
        texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
        await asyncio.wait_for(runner.run("job-ray", texts, labels, str(tiny_model_dir), params, collect), 180)
    finally:
        runner.stop()
    assert updates[0]["worker_pid"] != os.getpid()  # trained (and logged) in a Ray worker process
    mlflow = client(mlflow_server)
    assert [m.step for m in mlflow.get_metric_history(run_id, "accuracy")] == [25, 50]
    assert mlflow.get_run(run_id).data.params["effective_steps"] == "50"
    assert {CONFUSION_JSON, CONFUSION_CSV} <= {a.path for a in mlflow.list_artifacts(run_id)}


async def test_a_job_resumed_by_a_new_gateway_continues_its_run(
    mlflow_server: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    tracking = TrackingConfig(mlflow_server, f"resume-{tmp_path.name}")
    first = Jobs(tmp_path, tiny_model_dir, FakeRunner(gate=asyncio.Event()), tracking)
    job = await first.manager.submit("acme", first.spec(method="head"))
    await asyncio.wait_for(first.runner.mid_training.wait(), 30)
    stopped = await first.manager.get("acme", job.id)
    await first.manager.close()  # a shutdown: the job stays unfinished with its run id in its record
    assert first.runner.params[0].tracking == TrackingSpec(mlflow_server, run_id_of(stopped))

    second = Jobs(tmp_path, tiny_model_dir, LocalRunner(), tracking)
    await second.manager.start()
    events = await second.events(job.id)
    assert events[-1].state is JobState.SUCCEEDED, events[-1].message
    assert second.runner.params[0].tracking == TrackingSpec(mlflow_server, run_id_of(stopped))
    await second.manager.close()

    mlflow = client(mlflow_server)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    [run] = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.job_id = '{job.id}'")
    assert run.info.run_id == run_id_of(stopped) and run.info.status == "FINISHED"
    assert len(mlflow.get_metric_history(run.info.run_id, "accuracy")) == HEAD_STEPS // 25


async def test_a_failed_job_ends_its_run_failed_with_the_reason(
    mlflow_server: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    runner = FakeRunner(error=TrainingFailed("training diverged: loss became NaN at step 3"))
    jobs = Jobs(tmp_path, tiny_model_dir, runner, TrackingConfig(mlflow_server, f"failed-{tmp_path.name}"))
    job = await jobs.manager.submit("acme", jobs.spec(method="head"))
    events = await jobs.events(job.id)
    assert events[-1].state is JobState.FAILED
    record = await jobs.manager.get("acme", job.id)
    await jobs.manager.close()
    run = client(mlflow_server).get_run(run_id_of(record))
    assert record.error == "training diverged: loss became NaN at step 3"
    assert run.info.status == "FAILED" and run.data.tags["error"] == record.error and "adapter_ref" not in run.data.tags


async def test_an_unreachable_tracking_server_does_not_fail_the_job(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    jobs = Jobs(tmp_path, tiny_model_dir, LocalRunner(), TrackingConfig(dead))
    with caplog.at_level(logging.WARNING, logger="adaptgate.training.tracking"):
        job = await jobs.manager.submit("acme", jobs.spec(method="head"))
        events = await jobs.events(job.id)
    await jobs.manager.close()
    assert events[-1].state is JobState.SUCCEEDED, events[-1].message
    assert "tracking" not in (await jobs.manager.get("acme", job.id)).details
    warnings = [r for r in caplog.records if r.name == "adaptgate.training.tracking"]
    assert len(warnings) == 1 and "without experiment tracking" in warnings[0].getMessage()


def test_a_tracker_whose_server_is_gone_warns_once_and_goes_quiet(caplog: pytest.LogCaptureFixture) -> None:
    tracker = MlflowTracker(f"http://127.0.0.1:{free_port()}", "0123456789abcdef")
    with caplog.at_level(logging.WARNING, logger="adaptgate.training.tracking"):
        tracker.log_params({"seed": 1})
        for step in (1, 2, 3):
            tracker.log_metrics({"accuracy": 0.5}, step)
        tracker.log_dict({"matrix": [[1]]}, CONFUSION_JSON)
        tracker.end("FINISHED")
    warnings = [r.getMessage() for r in caplog.records if r.name == "adaptgate.training.tracking"]
    assert tracker.failed and len(warnings) == 1 and "could not log parameters" in warnings[0]


def test_an_unreachable_server_opens_no_run(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adaptgate.training.tracking"):
        assert open_job_run(TrackingConfig(f"http://127.0.0.1:{free_port()}"), "job-x", {}, {}) == ""
    assert "job job-x runs without experiment tracking" in caplog.text


def test_mlflow_is_imported_only_by_a_tracker_that_is_on() -> None:
    """No adaptgate module imports mlflow at import time, and the off path (a no-op tracker) never does."""
    import adaptgate

    package = Path(adaptgate.__file__).parent
    for source in package.rglob("*.py"):
        for node in ast.parse(source.read_text()).body:  # module level only: imports inside functions are lazy
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "mlflow" for n in names), f"{source} imports mlflow at module level"
    code = (
        "import sys\n"
        "from adaptgate.training.tracking import open_tracker, tracked_report\n"
        "tracker = open_tracker(None)\n"
        "tracker.log_params({'a': 1}); tracker.log_metrics({'a': 1.0}, 1)\n"
        "tracked_report(tracker, print)({'kind': 'eval', 'metrics': {'a': 1.0}, 'step': 1})\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stderr
