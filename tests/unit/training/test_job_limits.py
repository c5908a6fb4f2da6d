"""Limits on what jobs may take: wall-clock time per job, active jobs per tenant and per server, LoRA rank."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adaptgate.errors import InvalidArgument, ResourceExhausted
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.records import JobRecord, JobState
from adaptgate.training.methods.lora import LoraParams

from .fakes import FakeRunner
from .test_job_manager import World, events_of


class FakeClock:
    """The time limit's sleep: records how long it was asked to wait and returns when the test says time is up."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.waiting = asyncio.Event()
        self.up = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.waiting.set()
        await self.up.wait()


async def test_a_job_past_its_time_limit_fails_and_its_worker_is_cancelled(tmp_path: Path) -> None:
    clock = FakeClock()
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()), JobLimits(max_job_seconds=3600), sleep=clock.sleep)
    job = await w.manager.submit("acme", w.spec(max_seconds=90))
    await asyncio.wait_for(w.runner.mid_training.wait(), 5)
    await asyncio.wait_for(clock.waiting.wait(), 5)
    assert clock.asked == [90]
    watcher = asyncio.create_task(events_of(w.manager, job.id))
    clock.up.set()  # 90 s have passed and the worker is still training
    events = await watcher
    assert (events[-1].kind, events[-1].state) == ("state", JobState.FAILED)
    final = await w.manager.get("acme", job.id)
    assert final.error == "the job exceeded its time limit of 90 s; ask for fewer epochs or steps, or a larger max_seconds"
    assert w.runner.cancelled == [job.id] and w.publisher.requests == []
    assert w.runner.discarded == [job.id]
    await w.manager.close()


async def test_without_max_seconds_a_job_gets_the_servers_limit(tmp_path: Path) -> None:
    clock = FakeClock()
    w = World(tmp_path, FakeRunner(), JobLimits(max_job_seconds=7200), sleep=clock.sleep)
    job = await w.manager.submit("acme", w.spec())
    assert (await events_of(w.manager, job.id))[-1].state is JobState.SUCCEEDED
    assert clock.asked == [7200]
    await w.manager.close()


async def test_max_seconds_above_the_servers_limit_is_refused(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(), JobLimits(max_job_seconds=3600))
    with pytest.raises(InvalidArgument, match=r"max_seconds must be between 0 \(this server's limit, 3600 s\) and 3600; got 3601"):
        await w.manager.submit("acme", w.spec(max_seconds=3601))
    assert await w.manager.list(None) == []
    await w.manager.close()


async def test_active_jobs_are_capped_per_server_as_well_as_per_tenant(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()), JobLimits(active_per_tenant=2, active_total=3))
    results = await asyncio.gather(*(w.manager.submit("acme", w.spec()) for _ in range(4)), return_exceptions=True)
    accepted = [r for r in results if isinstance(r, JobRecord)]
    refused = [r for r in results if isinstance(r, ResourceExhausted)]
    assert (len(accepted), len(refused)) == (2, 2), results  # concurrent submits cannot slip past the count
    assert "tenant 'acme' already has 2 queued or running jobs (the limit is 2)" in refused[0].message
    await w.manager.submit("globex", w.spec(dataset_id=w.other))
    with pytest.raises(ResourceExhausted, match=r"the server already has 3 queued or running jobs \(the limit is 3\)"):
        await w.manager.submit("globex", w.spec(dataset_id=w.other))
    await w.manager.close()


async def test_the_default_lora_rank_never_exceeds_the_servers_max_lora_rank(tmp_path: Path) -> None:
    """A server with max_lora_rank 8 trains its default LoRA at rank 8, and refuses an explicit 16 at submit."""
    w = World(tmp_path, FakeRunner(), JobLimits(max_lora_rank=8))
    with pytest.raises(InvalidArgument, match=r"and 8 \(this server's max_lora_rank\); got 16"):
        await w.manager.submit("acme", w.spec(method="lora", lora_rank=16))
    job = await w.manager.submit("acme", w.spec(method="lora"))
    assert (await events_of(w.manager, job.id))[-1].state is JobState.SUCCEEDED
    [params] = w.runner.params
    assert isinstance(params, LoraParams) and params.rank == 8
    await w.manager.close()
