"""RayRunner against a real local Ray (integration: starts Ray, ~20 s on 2 CPUs)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptgate.training.head import HeadParams
from adaptgate.training.ray_runner import RayRunner
from adaptgate.training.runner import TrainingFailed
from adaptgate.training.updates import Update

from .conftest import separable_rows

pytestmark = pytest.mark.integration

ROWS = separable_rows(30)
TEXTS, LABELS = [r["text"] for r in ROWS], [r["label"] for r in ROWS]


@pytest.fixture(scope="module")
def runner() -> Iterator[RayRunner]:
    ray_runner = RayRunner(None, num_cpus=2, task_cpus=1.0)
    ray_runner.start()
    yield ray_runner
    ray_runner.stop()


async def test_run_streams_updates_and_returns_the_head(runner: RayRunner, tiny_model_dir: Path) -> None:
    updates: list[Update] = []
    params = HeadParams(seed=0, epochs=100, eval_every=50)
    result = await asyncio.wait_for(runner.run("job-a", TEXTS, LABELS, str(tiny_model_dir), params, updates.append), 120)
    assert result.weight.shape == (2, 32) and result.labels == ["animal", "money"]
    assert result.metrics["accuracy"] >= 0.9
    kinds = [u["kind"] for u in updates]
    assert kinds[0] == "started" and "Ray worker pid" in updates[0]["message"]
    assert "progress" in kinds and kinds.count("eval") == 2


async def test_training_error_becomes_training_failed(runner: RayRunner, tiny_model_dir: Path) -> None:
    params = HeadParams(epochs=10, eval_every=5, learning_rate=1e30)
    with pytest.raises(TrainingFailed, match="training diverged: loss became .* at step 2"):
        await asyncio.wait_for(runner.run("job-b", TEXTS, LABELS, str(tiny_model_dir), params, lambda u: None), 120)


async def test_cancel_stops_the_task(runner: RayRunner, tiny_model_dir: Path) -> None:
    started = asyncio.Event()

    def on_event(update: Update) -> None:
        started.set()

    params = HeadParams(epochs=100_000, eval_every=100_000)  # would run for minutes
    task = asyncio.create_task(runner.run("job-c", TEXTS, LABELS, str(tiny_model_dir), params, on_event))
    await asyncio.wait_for(started.wait(), 60)
    runner.cancel("job-c")
    with pytest.raises((TrainingFailed, asyncio.CancelledError)):
        await asyncio.wait_for(task, 10)
    # The CPU is free again: a short job still runs.
    quick = HeadParams(epochs=5, eval_every=5)
    result = await asyncio.wait_for(runner.run("job-d", TEXTS, LABELS, str(tiny_model_dir), quick, lambda u: None), 60)
    assert result.labels == ["animal", "money"]


async def test_a_killed_worker_is_retried_and_the_job_finishes(runner: RayRunner, tiny_model_dir: Path) -> None:
    pids: list[int] = []
    updates: list[Update] = []

    def on_event(update: Update) -> None:
        updates.append(update)
        if "worker_pid" in update and not pids:
            pids.append(update["worker_pid"])
            os.kill(update["worker_pid"], signal.SIGKILL)

    params = HeadParams(epochs=50, eval_every=25)
    result = await asyncio.wait_for(runner.run("job-e", TEXTS, LABELS, str(tiny_model_dir), params, on_event), 120)
    assert pids and result.labels == ["animal", "money"]
    assert [u["kind"] for u in updates].count("eval") == 2  # the retry's updates continue, none repeated
