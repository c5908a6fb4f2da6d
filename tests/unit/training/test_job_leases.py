"""Control replicas sharing one PostgreSQL own jobs through leases (real PostgreSQL, fake runner).

A replica that stops hands its jobs over, a replica whose lease was taken stops driving the job
and writes nothing more for it, and a cancel on one replica ends a job another replica runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.jobs.records import JobSpec, JobState
from adaptgate.training.jobs.store import JobStore

from .conftest import jsonl, separable_rows
from .fakes import FakePublisher, FakeRunner
from .test_job_manager import events_of

LEASE_S = 0.6  # renewed every 0.2 s: the tests wait on events, never on the clock
pytestmark = pytest.mark.asyncio(loop_scope="session")  # the managers' lease loops run on the fixture's loop


@dataclass
class Replica:
    name: str
    db: Database
    runner: FakeRunner
    publisher: FakePublisher
    datasets: DatasetStore
    manager: JobManager


def replica(name: str, url: str, storage: Path, gate: asyncio.Event | None = None) -> Replica:
    db = Database(url)
    runner, publisher = FakeRunner(gate=gate), FakePublisher()
    datasets = DatasetStore(storage / "datasets", db)
    manager = JobManager(db, datasets, runner, publisher, storage / "model", owner=name, lease_seconds=LEASE_S)
    return Replica(name, db, runner, publisher, datasets, manager)


@pytest.fixture
async def pair(tmp_path: Path, pg_database_url: str) -> AsyncIterator[tuple[Replica, Replica]]:
    a = replica("a", pg_database_url, tmp_path, gate=asyncio.Event())
    b = replica("b", pg_database_url, tmp_path)
    await a.manager.start()
    await b.manager.start()
    yield a, b
    for r in (a, b):
        await r.manager.close()
        r.db.close()


async def submit_held(a: Replica) -> str:
    dataset = a.datasets.create("acme", "d", "jsonl", jsonl(separable_rows(4)))
    job = await a.manager.submit("acme", JobSpec(dataset_id=dataset.id, adapter_name="spam", method="head"))
    await asyncio.wait_for(a.runner.mid_training.wait(), 10)
    return job.id


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_a_replica_that_stops_hands_its_running_job_to_another_which_finishes_it(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    job_id = await submit_held(a)
    assert b.runner.calls == []  # a live owner's job is left alone
    await a.manager.close()  # a rolling update: the lease is released, not left to expire
    events = await events_of(b.manager, job_id)
    assert events[-1].state is JobState.SUCCEEDED, events[-1].message
    assert any(e.message == "taken over by replica b: the replica that ran it stopped renewing its lease" for e in events)
    assert b.runner.calls == [job_id] and a.publisher.requests == [] and len(b.publisher.requests) == 1


async def test_a_replica_whose_lease_was_taken_stops_and_writes_nothing_more(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    job_id = await submit_held(a)
    [taken] = JobStore(b.db, "c", 60.0).claim([job_id], expired_only=False)  # a third replica, as if a's lease had lapsed
    assert taken.id == job_id
    await wait_for(lambda: job_id in a.runner.cancelled)
    a.runner.gate.set()  # type: ignore[union-attr]
    await wait_for(lambda: job_id not in a.manager.driving())  # the run is gone, not finished
    assert a.publisher.requests == []
    record = await b.manager.get("acme", job_id)
    assert record.state is not JobState.SUCCEEDED and record.adapter_ref == ""
    assert JobStore(b.db).lease(job_id)[0] == "c"  # type: ignore[index]


async def test_a_cancel_on_one_replica_ends_a_job_another_runs(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    job_id = await submit_held(a)
    cancelled = await b.manager.cancel("acme", job_id)
    assert cancelled.state is JobState.CANCELLED
    await wait_for(lambda: job_id in a.runner.cancelled)
    a.runner.gate.set()  # type: ignore[union-attr]
    await wait_for(lambda: job_id not in a.manager.driving())
    events = await events_of(a.manager, job_id)
    assert events[-1].state is JobState.CANCELLED
    assert [e.state for e in events].count(JobState.CANCELLED) == 1
    assert a.publisher.requests == [] and b.publisher.requests == []
