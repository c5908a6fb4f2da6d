from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adaptgate.training.database import Database
from adaptgate.training.job_records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.training.job_store import JobStore


def test_wal_mode_and_tables(tmp_path: Path) -> None:
    db = Database(tmp_path / "sub" / "a.db")
    assert db.query_one("PRAGMA journal_mode")[0] == "wal"  # type: ignore[index]
    names = {r[0] for r in db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"datasets", "jobs", "job_events"} <= names


def test_jobs_and_events_survive_reopen(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "a.db"))
    record = JobRecord.new("acme", JobSpec("ds-1", "spam", method="head", seed=7))
    store.insert(record, JobEvent(record.id, 0, 1.0, JobState.QUEUED, "state", "queued"))
    record.state, record.metrics = JobState.RUNNING, {"accuracy": 0.5}
    second = store.save(record, JobEvent(record.id, 0, 2.0, JobState.RUNNING, "state", "running"))
    assert second.seq == 2
    store.db.close()
    reopened = JobStore(Database(tmp_path / "a.db"))
    assert reopened.get(record.id) == record
    assert [e.seq for e in reopened.events_after(record.id, 0)] == [1, 2]
    assert reopened.events_after(record.id, 1)[0].message == "running"
    assert reopened.unfinished() == [record]
    assert reopened.counts_by_state()["RUNNING"] == 1


def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    db = Database(tmp_path / "a.db")
    with pytest.raises(RuntimeError):
        with db.transaction() as conn:
            conn.execute("INSERT INTO job_events VALUES ('j', 1, 0, 'QUEUED', 'state', '', 0, '{}', 0, '{}')")
            raise RuntimeError("boom")
    assert db.query("SELECT * FROM job_events") == []


def test_concurrent_event_appends_get_distinct_seqs(tmp_path: Path) -> None:
    store = JobStore(Database(tmp_path / "a.db"))

    def append() -> None:
        for _ in range(50):
            with store.db.transaction() as conn:
                store._append(conn, JobEvent("job-x", 0, 0.0, JobState.RUNNING, "log", "x"))

    threads = [threading.Thread(target=append) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.seq for e in store.events_after("job-x", 0)] == list(range(1, 201))
