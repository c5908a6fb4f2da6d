from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from safetensors.torch import load

from adaptgate.errors import InvalidArgument, JobNotFound, NotFound, ResourceExhausted
from adaptgate.training.database import Database
from adaptgate.training.datasets import DatasetStore
from adaptgate.training.job_store import JobStore
from adaptgate.training.jobs import JobEvent, JobManager, JobRecord, JobSpec, JobState, TrainingFailed

from .conftest import jsonl, separable_rows
from .fakes import FakePublisher, FakeRunner


class World:
    """A manager over a temp database with one dataset per tenant ('acme' and 'globex')."""

    def __init__(self, root: Path, runner: FakeRunner, max_active: int = 4) -> None:
        self.root, self.runner, self.publisher = root, runner, FakePublisher()
        self.db = Database(root / "jobs.db")
        self.datasets = DatasetStore(root / "datasets", self.db)
        existing = {r.tenant: r.id for r in self.datasets.list(None)}
        self.dataset = existing.get("acme") or self.datasets.create("acme", "d", "jsonl", jsonl(separable_rows(4))).id
        self.other = existing.get("globex") or self.datasets.create("globex", "d", "jsonl", jsonl(separable_rows(4))).id
        self.manager = JobManager(self.db, self.datasets, runner, self.publisher, root / "model", max_active)

    def spec(self, **kw: object) -> JobSpec:
        return JobSpec(**{"dataset_id": self.dataset, "adapter_name": "spam", "method": "head", **kw})  # type: ignore[arg-type]


async def events_of(manager: JobManager, job_id: str, tenant: str | None = "acme") -> list[JobEvent]:
    async def collect() -> list[JobEvent]:
        return [e async for e in manager.watch(tenant, job_id)]

    return await asyncio.wait_for(collect(), timeout=10)


@pytest.fixture
async def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    w = World(tmp_path, FakeRunner())
    yield w
    await w.manager.close()


async def test_submit_runs_to_success_and_publishes_head_files_once(world: World) -> None:
    job = await world.manager.submit("acme", world.spec(alias="prod", seed=3, epochs=50))
    assert job.state is JobState.QUEUED and job.id.startswith("job-")
    events = await events_of(world.manager, job.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [(e.kind, e.state) for e in events if e.kind == "state"] == [
        ("state", JobState.QUEUED), ("state", JobState.RUNNING), ("state", JobState.SUCCEEDED)]
    assert {"progress", "eval"} <= {e.kind for e in events}
    final = await world.manager.get("acme", job.id)
    assert (final.state, final.adapter_ref, final.progress) == (JobState.SUCCEEDED, "acme/spam@v1", 1.0)
    assert final.metrics["accuracy"] == pytest.approx(0.95) and events[-1].metrics == final.metrics
    [request] = world.publisher.requests
    assert (request.tenant, request.adapter_name, request.alias, request.source) == ("acme", "spam", "prod", f"job:{job.id}")
    assert json.loads(request.files["labels.json"]) == ["animal", "money"]
    assert load(request.files["adapter_model.safetensors"])["base_model.model.classifier.weight"].shape == (2, 8)
    assert json.loads(request.files["adaptgate.json"])["base_fingerprint"] == "fp-test"
    params = world.runner.params[0]
    assert (params.seed, params.epochs, params.validation_fraction) == (3, 50, 0.1)


async def test_watch_replays_from_the_start_after_the_end(world: World) -> None:
    job = await world.manager.submit("acme", world.spec())
    first = await events_of(world.manager, job.id)
    again = await events_of(world.manager, job.id, tenant=None)
    assert again == first and again[0].seq == 1 and again[0].message.startswith("queued")


async def test_failure_is_failed_with_reason_and_nothing_published(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(error=TrainingFailed("training diverged: loss became NaN at step 3")))
    job = await w.manager.submit("acme", w.spec())
    events = await events_of(w.manager, job.id)
    final = await w.manager.get("acme", job.id)
    assert final.state is JobState.FAILED and final.error == "training diverged: loss became NaN at step 3"
    assert events[-1].state is JobState.FAILED and "NaN at step 3" in events[-1].message
    assert w.publisher.requests == []


async def test_unexpected_exception_fails_the_job(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(error=ZeroDivisionError("oops")))
    job = await w.manager.submit("acme", w.spec())
    await events_of(w.manager, job.id)
    assert (await w.manager.get(None, job.id)).error == "internal error: ZeroDivisionError: oops"


async def test_cancel_is_prompt_and_publishes_nothing(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()))
    job = await w.manager.submit("acme", w.spec())
    await asyncio.wait_for(w.runner.mid_training.wait(), 5)
    cancelled = await asyncio.wait_for(w.manager.cancel("acme", job.id), 5)
    assert cancelled.state is JobState.CANCELLED
    assert w.runner.cancelled == [job.id] and w.publisher.requests == []
    events = await events_of(w.manager, job.id)
    assert events[-1].state is JobState.CANCELLED and events[-1].kind == "state"
    assert await w.manager.cancel("acme", job.id) == cancelled  # terminal: unchanged


async def test_cancel_of_a_finished_job_returns_it_unchanged(world: World) -> None:
    job = await world.manager.submit("acme", world.spec())
    await events_of(world.manager, job.id)
    done = await world.manager.get("acme", job.id)
    assert await world.manager.cancel("acme", job.id) == done
    assert done.state is JobState.SUCCEEDED


async def test_other_tenant_sees_not_found(world: World) -> None:
    job = await world.manager.submit("acme", world.spec())
    for call in (world.manager.get, world.manager.cancel):
        with pytest.raises(JobNotFound, match=f"job '{job.id}' not found"):
            await call("globex", job.id)
    with pytest.raises(JobNotFound):
        await events_of(world.manager, job.id, tenant="globex")
    with pytest.raises(JobNotFound, match="job 'job-missing' not found"):
        await world.manager.get("acme", "job-missing")
    assert await world.manager.list("globex") == []
    assert [j.id for j in await world.manager.list(None)] == [job.id]


async def test_submit_checks(world: World) -> None:
    with pytest.raises(InvalidArgument, match="unknown method 'bogus'; use 'head', 'lora', 'embed' or 'auto'"):
        await world.manager.submit("acme", world.spec(method="bogus"))
    with pytest.raises(InvalidArgument, match="lora_rank must be between 0"):
        await world.manager.submit("acme", world.spec(method="lora", lora_rank=65))
    with pytest.raises(InvalidArgument, match="adapter_name"):
        await world.manager.submit("acme", world.spec(adapter_name="Bad Name"))
    with pytest.raises(InvalidArgument, match="validation_fraction"):
        await world.manager.submit("acme", world.spec(validation_fraction=0.9))
    with pytest.raises(NotFound, match="dataset"):
        await world.manager.submit("acme", world.spec(dataset_id=world.other))
    assert await world.manager.list(None) == []


async def test_auto_resolves_to_head_and_says_so(world: World) -> None:
    job = await world.manager.submit("acme", world.spec(method="auto", validation_fraction=0.0))
    assert job.method == "head" and job.validation_fraction == 0.1
    events = await events_of(world.manager, job.id)
    assert any(e.kind == "log" and "method 'auto' chose 'head'" in e.message for e in events)


async def test_quota_per_tenant(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()), max_active=2)
    for _ in range(2):
        await w.manager.submit("acme", w.spec())
    with pytest.raises(ResourceExhausted, match="limit is 2"):
        await w.manager.submit("acme", w.spec())
    await w.manager.submit("globex", w.spec(dataset_id=w.other))  # other tenants unaffected
    assert w.manager.counts_by_state()["QUEUED"] + w.manager.counts_by_state()["RUNNING"] == 3
    w.runner.gate.set()  # type: ignore[union-attr]
    await asyncio.sleep(0.1)
    await w.manager.submit("acme", w.spec())
    await w.manager.close()


async def test_restart_reruns_a_job_left_running(tmp_path: Path) -> None:
    first = World(tmp_path, FakeRunner(gate=asyncio.Event()))
    job = await first.manager.submit("acme", first.spec())
    await asyncio.wait_for(first.runner.mid_training.wait(), 5)
    await first.manager.close()  # the gateway goes away mid-job
    assert (await first.manager.get(None, job.id)).state is JobState.RUNNING
    first.db.close()
    second = World(tmp_path, FakeRunner())
    await second.manager.start()
    events = await events_of(second.manager, job.id)
    assert any(e.message == "resumed after gateway restart" for e in events)
    assert events[-1].state is JobState.SUCCEEDED
    assert first.publisher.requests == [] and len(second.publisher.requests) == 1
    assert second.runner.calls == [job.id]
    await second.manager.close()


async def test_restart_reruns_a_job_found_running_in_the_database(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner())
    record = JobRecord.new("acme", w.spec())
    record.state = JobState.RUNNING
    JobStore(w.db).insert(record, JobEvent(record.id, 0, 0.0, JobState.RUNNING, "state", "running"))
    await w.manager.start()
    events = await events_of(w.manager, record.id)
    assert events[1].message == "resumed after gateway restart" and events[-1].state is JobState.SUCCEEDED
    assert w.manager.counts_by_state()["SUCCEEDED"] == 1
    await w.manager.close()
