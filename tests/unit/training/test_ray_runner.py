"""RayRunner against a real local Ray (integration: starts Ray, ~20 s on 2 CPUs)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from adaptgate.training.methods.head import HeadParams
from adaptgate.training.methods.lora import LoraParams, LoraResult
from adaptgate.training.runners.base import OnEvent, TrainingFailed
from adaptgate.training.runners.ray_runner import RayRunner
from adaptgate.training.runners.updates import Update

from .conftest import separable_rows

pytestmark = pytest.mark.integration

ROWS = separable_rows(30)
TEXTS, LABELS = [r["text"] for r in ROWS], [r["label"] for r in ROWS]


async def ignore(update: Update) -> None:
    return None


def collect(updates: list[Update]) -> OnEvent:
    async def append(update: Update) -> None:
        updates.append(update)

    return append


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayRunner]:
    ray_runner = RayRunner(None, num_cpus=2, task_cpus=1.0, checkpoint_root=tmp_path_factory.mktemp("checkpoints"))
    ray_runner.start()
    yield ray_runner
    ray_runner.stop()


async def test_run_streams_updates_and_returns_the_head(runner: RayRunner, tiny_model_dir: Path) -> None:
    updates: list[Update] = []
    params = HeadParams(seed=0, epochs=100, eval_every=50)
    result = await asyncio.wait_for(runner.run("job-a", TEXTS, LABELS, str(tiny_model_dir), params, collect(updates)), 120)
    assert result.weight.shape == (2, 32) and result.labels == ["animal", "money"]
    assert result.metrics["accuracy"] >= 0.9
    kinds = [u["kind"] for u in updates]
    assert kinds[0] == "started" and "Ray worker pid" in updates[0]["message"]
    assert "progress" in kinds and kinds.count("eval") == 2


async def test_training_error_becomes_training_failed(runner: RayRunner, tiny_model_dir: Path) -> None:
    params = HeadParams(epochs=10, eval_every=5, learning_rate=1e30)
    with pytest.raises(TrainingFailed, match="training diverged: loss became .* at step 2"):
        await asyncio.wait_for(runner.run("job-b", TEXTS, LABELS, str(tiny_model_dir), params, ignore), 120)


async def test_cancel_stops_the_task(runner: RayRunner, tiny_model_dir: Path) -> None:
    started = asyncio.Event()

    async def on_event(update: Update) -> None:
        started.set()

    params = HeadParams(epochs=100_000, eval_every=100_000)  # would run for minutes
    task = asyncio.create_task(runner.run("job-c", TEXTS, LABELS, str(tiny_model_dir), params, on_event))
    await asyncio.wait_for(started.wait(), 60)
    runner.cancel("job-c")
    with pytest.raises((TrainingFailed, asyncio.CancelledError)):
        await asyncio.wait_for(task, 10)
    # The CPU is free again: a short job still runs.
    quick = HeadParams(epochs=5, eval_every=5)
    result = await asyncio.wait_for(runner.run("job-d", TEXTS, LABELS, str(tiny_model_dir), quick, ignore), 60)
    assert result.labels == ["animal", "money"]


async def test_a_killed_worker_is_retried_and_the_job_finishes(runner: RayRunner, tiny_model_dir: Path) -> None:
    pids: list[int] = []
    updates: list[Update] = []

    async def on_event(update: Update) -> None:
        updates.append(update)
        if "worker_pid" in update and not pids:
            pids.append(update["worker_pid"])
            os.kill(update["worker_pid"], signal.SIGKILL)

    params = HeadParams(epochs=50, eval_every=25)
    result = await asyncio.wait_for(runner.run("job-e", TEXTS, LABELS, str(tiny_model_dir), params, on_event), 120)
    assert pids and result.labels == ["animal", "money"]
    assert [u["kind"] for u in updates].count("eval") == 2  # the retry's updates continue, none repeated


LORA = LoraParams(dtype="float32", device="cpu", learning_rate=1e-2, batch_size=16, max_tokens=32, seed=1,
                  validation_fraction=0.25, epochs=200, max_steps=600, eval_every=100)


async def test_a_killed_lora_worker_resumes_from_its_checkpoint(runner: RayRunner, tiny_model_dir: Path) -> None:
    """RELIABILITY 23: SIGKILL the worker after its first checkpoint; Ray's retry resumes there and finishes."""
    pids: list[int] = []
    updates: list[Update] = []

    async def on_event(update: Update) -> None:
        updates.append(update)
        if "worker_pid" in update and not pids:
            pids.append(update["worker_pid"])
        elif update["kind"] == "eval" and len(pids) == 1:
            pids.append(-1)
            os.kill(pids[0], signal.SIGKILL)  # the step-100 checkpoint is on disk before its eval event leaves

    result = await asyncio.wait_for(runner.run("job-lora-kill", TEXTS, LABELS, str(tiny_model_dir), LORA, on_event), 180)
    assert isinstance(result, LoraResult) and result.steps == 600 and result.resumed_from >= 100
    messages = [u["message"] for u in updates]
    assert any("an earlier attempt stopped, continuing from its checkpoint" in m for m in messages)
    assert any(f"resumed from the checkpoint at step {result.resumed_from}/600" in m for m in messages)
    assert all(u["kind"] != "skip" for u in updates)
    assert runner.checkpoint_dir("job-lora-kill").exists()
    runner.discard("job-lora-kill")
    assert not runner.checkpoint_dir("job-lora-kill").exists()

    straight = await asyncio.wait_for(runner.run("job-lora-straight", TEXTS, LABELS, str(tiny_model_dir), LORA, ignore), 180)
    runner.discard("job-lora-straight")
    assert straight.metrics["accuracy"] >= 0.9
    assert result.metrics["accuracy"] == pytest.approx(straight.metrics["accuracy"], abs=0.05)


async def test_a_diverging_lora_job_fails_with_the_reason(runner: RayRunner, tiny_model_dir: Path) -> None:
    params = dataclasses.replace(LORA, learning_rate=1e4, max_steps=50, eval_every=25)
    with pytest.raises(TrainingFailed, match="training diverged: loss became NaN at step"):
        await asyncio.wait_for(runner.run("job-lora-nan", TEXTS, LABELS, str(tiny_model_dir), params, ignore), 120)
    runner.discard("job-lora-nan")


async def test_a_job_run_again_after_a_gateway_restart_resumes_from_its_checkpoint(
    runner: RayRunner, tiny_model_dir: Path
) -> None:
    """RELIABILITY 24: the gateway went away mid-job (its task cancelled, the worker killed); the next
    gateway runs the job again under the same id and it continues from the checkpoint, not from step 0."""
    first_eval = asyncio.Event()

    async def on_event(update: Update) -> None:
        if update["kind"] == "eval":
            first_eval.set()

    task = asyncio.create_task(runner.run("job-restart", TEXTS, LABELS, str(tiny_model_dir), LORA, on_event))
    await asyncio.wait_for(first_eval.wait(), 120)
    runner.cancel("job-restart")  # what JobManager.close() does at shutdown
    task.cancel()
    with pytest.raises((TrainingFailed, asyncio.CancelledError)):
        await task
    assert runner.checkpoint_dir("job-restart").exists()

    updates: list[Update] = []
    result = await asyncio.wait_for(runner.run("job-restart", TEXTS, LABELS, str(tiny_model_dir), LORA, collect(updates)), 180)
    assert result.resumed_from >= 100 and result.steps == 600
    assert updates[0]["kind"] == "started" and "continuing from its checkpoint" in updates[0]["message"]
    assert all(u["kind"] != "skip" for u in updates)
    runner.discard("job-restart")


def test_the_gateway_gives_its_runner_the_shared_storage_and_the_training_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints go where every worker reaches them (ADAPTGATE_STORAGE_URI), never to a node's TMPDIR."""
    from adaptgate.server import ray_runner
    from adaptgate.settings import Settings

    monkeypatch.setenv("ADAPTGATE_TRAINING_RESOURCES", '{"adaptgate-training": 1}')
    settings = Settings(role="control", data_dir=tmp_path / "data", storage_uri=f"file://{tmp_path}/shared")
    runner = ray_runner(settings)
    assert runner is not None and runner.task_resources == {"adaptgate-training": 1.0}
    assert runner.checkpoint_dir("job-1").uri == f"file://{tmp_path}/shared/checkpoints/job-1"
    assert ray_runner(Settings(role="all", data_dir=tmp_path / "data")).checkpoint_dir("job-1").uri == (  # type: ignore[union-attr]
        f"{tmp_path}/data/checkpoints/job-1"
    )


async def test_a_job_asks_ray_for_the_training_resources(runner: RayRunner, tiny_model_dir: Path, tmp_path: Path) -> None:
    """task_resources pin jobs to the workers that offer them: here no node does, so Ray holds the job back."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    gcs = ray.get_runtime_context().gcs_address  # joined by address, as a gateway joins a cluster
    pinned = RayRunner(gcs, checkpoint_root=tmp_path, task_resources={"adaptgate-absent-pool": 1})
    updates: list[Update] = []
    task = asyncio.create_task(pinned.run("job-pinned", TEXTS, LABELS, str(tiny_model_dir), HeadParams(), collect(updates)))

    def waiting_for_the_pool() -> bool:
        demands = get_cluster_status(gcs).resource_demands.ray_task_actor_demand
        return any(b.bundle.get("adaptgate-absent-pool") == 1 for d in demands for b in d.bundles_by_count)

    try:
        for _ in range(120):
            if await asyncio.to_thread(waiting_for_the_pool):
                break
            await asyncio.sleep(0.5)  # polling Ray's view of pending work, with a deadline
        else:
            pytest.fail("Ray never saw a job asking for adaptgate-absent-pool")
        assert "adaptgate-absent-pool" not in ray.cluster_resources() and updates == []
    finally:
        pinned.cancel("job-pinned")
        task.cancel()
        with pytest.raises((TrainingFailed, asyncio.CancelledError)):
            await task


def test_a_local_ray_tolerates_a_busy_machine() -> None:
    """On a loaded machine the local raylet may answer health checks late; declaring it dead would end the gateway."""
    config = RayRunner(None, checkpoint_root="unused")._init_args()["_system_config"]
    assert config["health_check_failure_threshold"] >= 20 and config["health_check_timeout_ms"] >= 30_000
    assert "_system_config" not in RayRunner("127.0.0.1:6379", checkpoint_root="unused")._init_args()


async def test_ray_that_cannot_start_fails_the_job_not_the_gateway(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local Ray starts with the first job, so its failure to start is that job's FAILED reason."""
    import ray

    def refuse(**kwargs: object) -> None:
        raise RuntimeError("Timed out waiting for file gcs_server_port")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    lazy = RayRunner(None, num_cpus=1, checkpoint_root=tmp_path)
    with pytest.raises(TrainingFailed) as info:
        await lazy.run("job-x", TEXTS, LABELS, str(tmp_path), HeadParams(), ignore)
    error_id = internal_error_id(str(info.value), "could not start Ray (local)")
    assert "Timed out" not in str(info.value) and logged_with(caplog, error_id, "gcs_server_port")
    lazy.stop()  # nothing started, nothing to stop


def internal_error_id(message: str, what: str) -> str:
    """The error id in "<what> (error id <id>); the server log has the details", the only form an internal error takes."""
    found = re.fullmatch(re.escape(what) + r" \(error id ([0-9a-f]{12})\); the server log has the details", message)
    assert found, message
    return found.group(1)


def logged_with(caplog: pytest.LogCaptureFixture, error_id: str, detail: str) -> bool:
    return any(error_id in r.getMessage() and detail in str(r.exc_info[1] if r.exc_info else r.getMessage()) for r in caplog.records)


async def test_an_internal_worker_error_reaches_the_job_as_a_sentence_and_an_error_id(
    runner: RayRunner, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tenants read a sentence; the worker's exception (paths, library internals) goes to the log only."""
    broken = tmp_path / "no-model-here"
    broken.mkdir()  # there, but holds no model: transformers fails inside the worker
    with pytest.raises(TrainingFailed) as info:
        await asyncio.wait_for(runner.run("job-internal", TEXTS, LABELS, str(broken), HeadParams(), ignore), 120)
    error_id = internal_error_id(str(info.value), "the training task failed with an internal error")
    assert "no-model-here" not in str(info.value) and logged_with(caplog, error_id, "no-model-here")


async def test_a_worker_without_the_base_model_fails_the_job_with_the_fix(runner: RayRunner, tmp_path: Path) -> None:
    missing = tmp_path / "models" / "base"
    with pytest.raises(TrainingFailed) as info:
        await asyncio.wait_for(runner.run("job-no-model", TEXTS, LABELS, str(missing), HeadParams(), ignore), 120)
    assert str(info.value) == (
        f"the Ray worker cannot find the base model at {missing}; "
        "mount the gateway's model directory on the Ray workers at the same path"
    )


async def test_a_failing_event_handler_stops_the_worker(runner: RayRunner, tiny_model_dir: Path) -> None:
    """Whatever ends the run (here: the job database refusing the event) also ends its Ray task."""
    pids: list[int] = []

    async def on_event(update: Update) -> None:
        pids.append(update["worker_pid"])
        raise OSError("the job database cannot be written because the disk is full")

    params = HeadParams(epochs=100_000, eval_every=100_000)  # would run for minutes
    with pytest.raises(OSError, match="disk is full"):
        await asyncio.wait_for(runner.run("job-f", TEXTS, LABELS, str(tiny_model_dir), params, on_event), 60)
    psutil.Process(pids[0]).wait(timeout=30)  # the worker is gone (psutil raises TimeoutExpired if it is not)
