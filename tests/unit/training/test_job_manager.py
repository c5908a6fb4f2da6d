from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load

from adaptgate.errors import FailedPrecondition, InvalidArgument, JobNotFound, NotFound, ResourceExhausted
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database, DatabaseFull
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.manager import Sleep
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.jobs.records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.training.jobs.store import JobStore
from adaptgate.training.runners.base import TrainingFailed

from .conftest import jsonl, separable_rows
from .fakes import FakePublisher, FakeRunner


class World:
    """A manager over a temp database with one dataset per tenant ('acme' and 'globex')."""

    def __init__(self, root: Path, runner: FakeRunner, limits: JobLimits = JobLimits(), sleep: Sleep = asyncio.sleep) -> None:
        self.root, self.runner, self.publisher = root, runner, FakePublisher()
        self.db = Database(root / "jobs.db")
        self.datasets = DatasetStore(root / "datasets", self.db)
        existing = {r.tenant: r.id for r in self.datasets.list(None)}
        self.dataset = existing.get("acme") or self.datasets.create("acme", "d", "jsonl", jsonl(separable_rows(4))).id
        self.other = existing.get("globex") or self.datasets.create("globex", "d", "jsonl", jsonl(separable_rows(4))).id
        self.manager = JobManager(self.db, self.datasets, runner, self.publisher, root / "model", limits, sleep)

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


async def test_an_internal_error_shows_a_sentence_and_an_error_id_and_logs_the_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(tmp_path, FakeRunner(error=ZeroDivisionError("division by zero in /srv/secret/trainer.py")))
    job = await w.manager.submit("acme", w.spec())
    events = await events_of(w.manager, job.id)
    error = (await w.manager.get(None, job.id)).error
    found = re.fullmatch(r"the job failed with an internal error \(error id ([0-9a-f]{12})\); the server log has the details", error)
    assert found, error
    assert events[-1].state is JobState.FAILED and "secret" not in events[-1].message
    logged = [r for r in caplog.records if found.group(1) in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "/srv/secret" in str(logged[0].exc_info[1])


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
    for publishable_nowhere in ("spam\n", "a..b"):  # names the adapter store refuses would fail only at publish
        with pytest.raises(InvalidArgument, match="adapter_name"):
            await world.manager.submit("acme", world.spec(adapter_name=publishable_nowhere))
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
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()), JobLimits(active_per_tenant=2))
    for _ in range(2):
        await w.manager.submit("acme", w.spec())
    with pytest.raises(ResourceExhausted, match="limit is 2"):
        await w.manager.submit("acme", w.spec())
    await w.manager.submit("globex", w.spec(dataset_id=w.other))  # other tenants unaffected
    assert w.manager.counts_by_state()["QUEUED"] + w.manager.counts_by_state()["RUNNING"] == 3
    first = [j.id for j in await w.manager.list("acme")]
    w.runner.gate.set()  # type: ignore[union-attr]
    for job_id in first:
        assert (await events_of(w.manager, job_id))[-1].state is JobState.SUCCEEDED
    await w.manager.submit("acme", w.spec())  # finished jobs no longer count
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


async def test_a_lora_rank_above_the_servers_max_lora_rank_is_refused_at_submit(world: World) -> None:
    """Publishing refuses ranks above max_lora_rank (16 by default), so the job must not train first."""
    refusal = r"lora_rank must be between 0 \(the default\) and 16 \(this server's max_lora_rank\); got 32"
    with pytest.raises(InvalidArgument, match=refusal):
        await world.manager.submit("acme", world.spec(method="lora", lora_rank=32))
    assert await world.manager.list(None) == [] and world.runner.calls == []


def write_until_full(write: Callable[[int], object]) -> None:
    for i in range(100_000):
        try:
            write(i)
        except DatabaseFull:
            return
    raise AssertionError("the database never filled up")


def fill_the_disk(db: Database, job_id: str, rows_too: bool = False) -> None:
    """A full disk, deterministically: the file may not grow, and the job's own pages are packed with tiny events
    (with `rows_too`, the jobs table's page with tiny finished jobs), so every later event of the job (and any
    growth of its row) needs space that is not there."""
    db.query_one("PRAGMA max_page_count = 1")  # never below the current size
    store = JobStore(db)

    def event(i: int) -> None:
        with db.transaction() as conn:
            store._append(conn, JobEvent(job_id, 0, 0.0, JobState.RUNNING, "log", ""))

    write_until_full(event)
    if rows_too:
        write_until_full(lambda i: db.execute(
            f"INSERT INTO jobs VALUES ('{i}', 't', 'd', 'a', 'h', '', 0, 0, 0, 0, 'SUCCEEDED', '', '', 0, '', 0, 0, '', '', '', 0)"
        ))


async def test_a_full_disk_mid_job_fails_it_stops_its_worker_and_ends_its_watchers(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()))
    job = await w.manager.submit("acme", w.spec())
    await asyncio.wait_for(w.runner.mid_training.wait(), 5)
    watcher = asyncio.create_task(events_of(w.manager, job.id))
    fill_the_disk(w.db, job.id)
    w.runner.gate.set()  # type: ignore[union-attr]  # the worker reports its evaluation: that event cannot be written
    events = await watcher
    assert (events[-1].kind, events[-1].state) == ("state", JobState.FAILED)
    assert "the disk is full" in events[-1].message
    final = await w.manager.get("acme", job.id)
    assert final.state is JobState.FAILED and "the job database cannot be written because the disk is full" in final.error
    assert w.runner.cancelled == [job.id] and w.publisher.requests == []
    assert w.manager.counts_by_state()["RUNNING"] == 0
    await w.manager.close()


async def test_when_not_even_the_job_row_can_be_written_the_ending_is_kept_and_saved_by_a_later_write(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, FakeRunner(gate=asyncio.Event()))
    job = await w.manager.submit("acme", w.spec())
    await asyncio.wait_for(w.runner.mid_training.wait(), 5)
    watcher = asyncio.create_task(events_of(w.manager, job.id))
    fill_the_disk(w.db, job.id, rows_too=True)
    w.runner.gate.set()  # type: ignore[union-attr]
    events = await watcher
    assert (events[-1].kind, events[-1].state) == ("state", JobState.FAILED) and "the disk is full" in events[-1].message
    assert JobStore(w.db).get(job.id).state is JobState.RUNNING  # type: ignore[union-attr]  # what the file says...
    assert (await w.manager.get("acme", job.id)).state is JobState.FAILED  # ...and what everyone is told
    assert [j.state for j in await w.manager.list("acme")] == [JobState.FAILED]
    assert (w.manager.counts_by_state()["RUNNING"], w.manager.counts_by_state()["FAILED"]) == (0, 1)
    assert w.runner.cancelled == [job.id]
    w.db.query_one("PRAGMA max_page_count = 1000000")  # space is freed
    await w.manager.submit("acme", w.spec(adapter_name="next"))
    assert JobStore(w.db).get(job.id).state is JobState.FAILED  # type: ignore[union-attr]
    await w.manager.close()


async def test_a_database_locked_by_another_process_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    """Job calls wait for the lock in a thread: other coroutines (other tenants' requests) keep running."""
    w = World(tmp_path, FakeRunner())
    other = sqlite3.connect(tmp_path / "jobs.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    submit = asyncio.create_task(w.manager.submit("acme", w.spec()))
    ticked = asyncio.Event()

    async def heartbeat() -> None:
        for _ in range(20):
            await asyncio.sleep(0.01)
        ticked.set()

    beat = asyncio.create_task(heartbeat())
    await asyncio.wait_for(ticked.wait(), 3)  # well inside the database's 5 s busy timeout
    assert not submit.done()  # still waiting for the lock, without holding up the loop
    other.execute("ROLLBACK")
    other.close()
    job = await asyncio.wait_for(submit, 10)
    assert (await events_of(w.manager, job.id))[-1].state is JobState.SUCCEEDED
    await beat
    await w.manager.close()


async def test_a_validation_dataset_is_held_out_after_the_training_rows(world: World) -> None:
    validation = world.datasets.create("acme", "v", "jsonl", jsonl(separable_rows(3)))
    job = await world.manager.submit("acme", world.spec(validation_dataset_id=validation.id))
    assert job.validation_dataset_id == validation.id
    await events_of(world.manager, job.id)
    (texts, labels), params = world.runner.rows[-1], world.runner.params[-1]
    train, held = world.datasets.load(world.datasets.get("acme", world.dataset)), world.datasets.load(validation)
    assert (texts, labels) == (train[0] + held[0], train[1] + held[1])
    assert params.holdout_from == len(train[0])
    assert (await world.manager.get("acme", job.id)).validation_dataset_id == validation.id  # kept in the record


async def test_a_validation_dataset_must_be_the_tenants_and_carry_only_training_labels(world: World) -> None:
    with pytest.raises(NotFound):
        await world.manager.submit("acme", world.spec(validation_dataset_id=world.other))  # globex's
    with pytest.raises(NotFound):
        await world.manager.submit("acme", world.spec(validation_dataset_id="ds-000000000000"))
    foreign = world.datasets.create("acme", "f", "jsonl", jsonl(
        [{"text": f"weather report {i}", "label": "weather"} for i in range(2)] + separable_rows(2)))
    with pytest.raises(InvalidArgument, match="'weather'"):
        await world.manager.submit("acme", world.spec(validation_dataset_id=foreign.id))


async def test_a_validation_dataset_in_use_cannot_be_deleted(tmp_path: Path) -> None:
    gate = asyncio.Event()
    w = World(tmp_path, FakeRunner(gate=gate))
    validation = w.datasets.create("acme", "v", "jsonl", jsonl(separable_rows(3)))
    job = await w.manager.submit("acme", w.spec(validation_dataset_id=validation.id))
    await w.runner.mid_training.wait()
    with pytest.raises(FailedPrecondition, match=job.id):
        w.datasets.delete("acme", validation.id)
    gate.set()
    await events_of(w.manager, job.id)
    w.datasets.delete("acme", validation.id)  # free once the job has ended
    await w.manager.close()


async def test_an_out_of_scope_label_must_mark_rows_leave_two_classes_and_go_with_the_head(world: World) -> None:
    with pytest.raises(InvalidArgument, match="marks no row"):
        await world.manager.submit("acme", world.spec(out_of_scope_label="weather"))
    with pytest.raises(InvalidArgument, match="fewer than 2 classes"):
        await world.manager.submit("acme", world.spec(out_of_scope_label="money"))
    with pytest.raises(InvalidArgument, match="head method"):
        await world.manager.submit("acme", world.spec(method="lora", out_of_scope_label="money"))
    three = world.datasets.create("acme", "t", "jsonl", jsonl(
        separable_rows(3) + [{"text": f"weather report {i}", "label": "none"} for i in range(3)]))
    job = await world.manager.submit("acme", world.spec(dataset_id=three.id, method="auto", out_of_scope_label="none"))
    assert (job.method, job.out_of_scope_label) == ("head", "none")
    await events_of(world.manager, job.id)
    assert world.runner.params[-1].out_of_scope_label == "none"
