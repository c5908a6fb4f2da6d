"""The job store on both backends (SQLite and a real PostgreSQL): rows, events, admission and leases.

Two `Database` objects on one database stand for two control replicas; threads make them race.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from adaptgate.errors import ResourceExhausted, Unavailable
from adaptgate.training.db.database import Database
from adaptgate.training.jobs.records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.training.jobs.store import JobStore, LeaseLost

T = TypeVar("T")


@pytest.fixture
def replica_db(db_url: str, db: Database) -> Iterator[Database]:
    """A second replica's connection to the same database as `db`."""
    other = Database(db_url)
    yield other
    other.close()


def job(tenant: str = "acme", **spec: object) -> JobRecord:
    return JobRecord.new(tenant, JobSpec(**{"dataset_id": "ds-1", "adapter_name": "spam", "method": "head", **spec}))  # type: ignore[arg-type]


def event(record: JobRecord, message: str, state: JobState | None = None, kind: str = "state") -> JobEvent:
    return JobEvent(record.id, 0, 1.0, state or record.state, kind, message, metrics={"loss": 0.5}, details={"k": [1]})


def together(n: int, fn: Callable[[int], T]) -> list[T]:
    """`fn(0..n-1)` on n threads released at once; re-raises the first error."""
    start, results, errors = threading.Barrier(n), [None] * n, []

    def run(i: int) -> None:
        start.wait(10)
        try:
            results[i] = fn(i)  # type: ignore[call-overload]
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


# ----- rows and events ---------------------------------------------------------------------------


def test_a_job_and_its_events_round_trip(db: Database) -> None:
    store = JobStore(db)
    record = job(seed=7, lora_rank=8, auto=True, max_seconds=60)
    record.details = {"method": {"chosen": "head"}}
    store.insert(record, event(record, "queued"), event(record, "chose head", kind="log"))
    record.state, record.metrics, record.progress = JobState.RUNNING, {"accuracy": 0.5}, 0.25
    second = store.save(record, event(record, "running"))
    assert second.seq == 3
    assert store.get(record.id) == record
    assert store.get("job-missing") is None
    events = store.events_after(record.id, 0)
    assert [(e.seq, e.kind, e.message) for e in events] == [(1, "state", "queued"), (2, "log", "chose head"), (3, "state", "running")]
    assert events[0].metrics == {"loss": 0.5} and events[0].details == {"k": [1]} and events[0].state is JobState.QUEUED
    assert [e.seq for e in store.events_after(record.id, 2)] == [3]
    store.save_row(record)


def test_lists_unfinished_and_counts(db: Database) -> None:
    store = JobStore(db)
    first, second, other = job(), job(), job("globex")
    second.created_at = first.created_at + 1
    for r in (second, first, other):
        store.insert(r)
    first.state = JobState.SUCCEEDED
    store.save_row(first)
    assert [r.id for r in store.list_jobs("acme")] == [first.id, second.id]
    assert {r.id for r in store.list_jobs(None)} == {first.id, second.id, other.id}
    assert {r.id for r in store.unfinished()} == {second.id, other.id}
    assert store.counts_by_state() == {"QUEUED": 2, "RUNNING": 0, "SUCCEEDED": 1, "FAILED": 0, "CANCELLED": 0}


def test_admission_sees_the_tenants_and_the_servers_active_jobs(db: Database) -> None:
    store = JobStore(db)
    for tenant in ("acme", "acme", "globex"):
        store.insert(job(tenant))
    done = job("acme", adapter_name="done")
    store.insert(done)
    done.state = JobState.FAILED
    store.save_row(done)
    seen: list[tuple[int, int]] = []
    store.insert(job("acme"), admit=lambda mine, total: seen.append((mine, total)))
    assert seen == [(2, 3)]

    def refuse(mine: int, total: int) -> None:
        raise ResourceExhausted("no room")

    refused = job("acme")
    with pytest.raises(ResourceExhausted):
        store.insert(refused, event(refused, "queued"), admit=refuse)
    assert store.get(refused.id) is None and store.events_after(refused.id, 0) == []


def test_two_replicas_submitting_at_once_cannot_both_take_the_last_place(db: Database, replica_db: Database) -> None:
    """Each admit waits (with a deadline) for the other replica to count too: without turns both
    would count 0 active jobs and both insert."""
    stores = [JobStore(db, "a"), JobStore(replica_db, "b")]
    counted = threading.Semaphore(0)

    def admit(mine: int, total: int) -> None:
        counted.release()
        counted.acquire(timeout=0.5)  # the other replica's count, if it can count at the same time
        if total >= 1:
            raise ResourceExhausted("the server's last place is taken")

    def submit(i: int) -> str:
        try:
            stores[i].insert(job(adapter_name=f"a{i}"), admit=admit)
            return "admitted"
        except ResourceExhausted:
            return "refused"

    assert sorted(together(2, submit)) == ["admitted", "refused"]
    assert len(JobStore(db).list_jobs(None)) == 1


def test_concurrent_event_appends_get_distinct_seqs(db: Database, replica_db: Database) -> None:
    stores = [JobStore(db), JobStore(db), JobStore(replica_db), JobStore(replica_db)]

    def append(i: int) -> None:
        for _ in range(25):
            with stores[i].db.transaction() as conn:
                stores[i]._append(conn, JobEvent("job-x", 0, 0.0, JobState.RUNNING, "log", "x"))

    together(4, append)
    assert [e.seq for e in JobStore(db).events_after("job-x", 0)] == list(range(1, 101))


# ----- leases ------------------------------------------------------------------------------------


def test_a_new_job_is_leased_to_its_owner_by_the_database_clock(db: Database) -> None:
    store = JobStore(db, "replica-a", lease_seconds=60)
    record = job()
    store.insert(record)
    owner, remaining = store.lease(record.id)  # type: ignore[misc]
    assert owner == "replica-a" and 55 < remaining <= 60
    assert store.lease("job-missing") is None
    assert JobStore(db, "replica-b").claim() == []  # a live lease is left alone


def test_a_fenced_save_after_another_replica_took_the_job_is_lease_lost_and_writes_nothing(
    db: Database, replica_db: Database
) -> None:
    a, b = JobStore(db, "a", lease_seconds=0), JobStore(replica_db, "b")  # a's lease lapses at once
    record = job()
    a.insert(record, event(record, "queued"))
    [taken] = b.claim()
    assert taken == record and b.lease(record.id)[0] == "b"  # type: ignore[index]
    record.state, record.progress = JobState.RUNNING, 0.5
    with pytest.raises(LeaseLost, match=f"job {record.id} is now run by replica 'b'") as info:
        a.save(record, event(record, "running"))
    assert isinstance(info.value, Unavailable)
    with pytest.raises(LeaseLost):
        a.save_row(record)
    assert a.get(record.id).state is JobState.QUEUED and len(a.events_after(record.id, 0)) == 1  # type: ignore[union-attr]
    assert b.save(record, event(record, "running")).seq == 2  # the new owner writes on


def test_claim_takes_expired_and_unowned_active_jobs_only(db: Database) -> None:
    live, lapsed, unowned = JobStore(db, "live", 60), JobStore(db, "lapsed", 0), JobStore(db)
    held, expired, orphan, finished = job(), job(), job(), job()
    live.insert(held)
    lapsed.insert(expired)
    unowned.insert(orphan)
    lapsed.insert(finished)
    finished.state = JobState.SUCCEEDED
    lapsed.save_row(finished)
    claimer = JobStore(db, "c", 60)
    assert claimer.claim([expired.id]) == [expired]
    assert claimer.claim() == [orphan]
    assert claimer.claim() == []  # now c's, with a live lease
    assert {r.id for r in JobStore(db, "d").claim(expired_only=False)} == {held.id, expired.id, orphan.id}
    assert JobStore(db, "d").lease(finished.id)[0] == "lapsed"  # type: ignore[index]  # a finished job is never taken


def test_two_replicas_claiming_at_once_each_job_goes_to_exactly_one(db: Database, replica_db: Database) -> None:
    lapsed = JobStore(db, "gone", lease_seconds=0)
    ids = set()
    for _ in range(20):
        record = job()
        lapsed.insert(record)
        ids.add(record.id)
    stores = [JobStore(db, "a"), JobStore(replica_db, "b"), JobStore(db, "c"), JobStore(replica_db, "d")]
    claimed = together(4, lambda i: [r.id for r in stores[i].claim()])
    flat = [job_id for ids_ in claimed for job_id in ids_]
    assert sorted(flat) == sorted(ids)  # every job once: none twice, none lost
    for store, taken in zip(stores, claimed):
        assert all(store.lease(job_id)[0] == store.owner for job_id in taken)  # type: ignore[index]


def test_renew_extends_held_leases_and_drops_lost_and_ended_jobs(db: Database, replica_db: Database) -> None:
    a = JobStore(db, "a", lease_seconds=0)
    kept, lost, ended = job(), job(), job()
    for r in (kept, lost, ended):
        a.insert(r)
    JobStore(replica_db, "b").claim([lost.id])
    ended.state = JobState.CANCELLED
    assert JobStore(replica_db, "b").cancel(ended, event(ended, "cancelled"))
    assert JobStore(db, "a", lease_seconds=60).renew([kept.id, lost.id, ended.id]) == {kept.id}
    assert a.lease(kept.id)[1] > 55  # type: ignore[index]
    assert a.renew([]) == set()


def test_release_makes_a_job_claimable_at_once(db: Database, replica_db: Database) -> None:
    a, b = JobStore(db, "a", lease_seconds=60), JobStore(replica_db, "b")
    record = job()
    a.insert(record)
    assert b.claim() == []
    a.release([record.id])
    assert a.lease(record.id)[1] <= 0  # type: ignore[index]
    assert [r.id for r in b.claim()] == [record.id]
    a.release([record.id])  # not a's any more: nothing changes
    assert b.lease(record.id)[0] == "b" and b.lease(record.id)[1] > 0  # type: ignore[index]


def test_a_cancel_from_any_replica_ends_an_active_job_once(db: Database, replica_db: Database) -> None:
    a, b = JobStore(db, "a"), JobStore(replica_db, "b")
    record = job()
    a.insert(record, event(record, "queued"))
    record.state = JobState.CANCELLED
    assert b.cancel(record, event(record, "cancelled"))
    assert not b.cancel(record, event(record, "cancelled again"))
    assert [e.message for e in a.events_after(record.id, 0)] == ["queued", "cancelled"]
    record.state = JobState.RUNNING
    with pytest.raises(LeaseLost, match=rf"job {record.id} was ended elsewhere \(CANCELLED\)"):
        a.save(record, event(record, "running"))
    assert a.get(record.id).state is JobState.CANCELLED  # type: ignore[union-attr]
