from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest

from adaptgate.errors import ResourceExhausted, Unavailable
from adaptgate.training.db.database import Database, DatabaseBusy, DatabaseFull, DatabaseIOError, DatabaseUnavailable, postgres_failure
from adaptgate.training.jobs.records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.training.jobs.store import JobStore
from tests.postgres import NOT_INSTALLED, PostgresServer, binaries, free_port


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
            conn.exec_driver_sql("INSERT INTO job_events VALUES ('j', 1, 0, 'QUEUED', 'state', '', 0, '{}', 0, '{}')")
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


def fill(db: Database) -> None:
    """Writes until the database refuses: what a full disk looks like to SQLite."""
    with pytest.raises(DatabaseFull):
        for i in range(100_000):
            db.execute("INSERT INTO job_events VALUES (?, 1, 0, 'QUEUED', 'state', ?, 0, '{}', 0, '{}')", (f"j{i}", "x" * 500))


def test_a_full_disk_is_a_clear_error_and_the_database_stays_usable(tmp_path: Path) -> None:
    """SQLITE_FULL rolls the transaction back itself; the error that surfaces is the full disk, not the ROLLBACK's."""
    db = Database(tmp_path / "a.db")
    db.query_one("PRAGMA max_page_count = 1")  # the file may not grow (never below its size): a full disk, deterministically
    fill(db)
    with pytest.raises(ResourceExhausted, match="the job database cannot be written because the disk is full") as info:
        with db.transaction() as conn:
            conn.exec_driver_sql("INSERT INTO job_events VALUES ('k', 1, 0, 'QUEUED', 'state', ?, 0, '{}', 0, '{}')", ("y" * 5000,))
    assert isinstance(info.value, DatabaseFull)
    assert db.query("SELECT * FROM job_events WHERE job_id = 'k'") == []
    db.query_one("PRAGMA max_page_count = 1000000")  # space is freed: writes work again on the same connection
    assert db.execute("DELETE FROM job_events WHERE job_id = 'j0'") == 1


def test_a_database_locked_by_another_process_is_a_clear_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "a.db", busy_timeout_s=0.05)
    other = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(Unavailable, match=r"the job database is locked by another process \(waited 0.05 s\); try again shortly") as info:
        db.execute("INSERT INTO job_events VALUES ('j', 1, 0, 'QUEUED', 'state', '', 0, '{}', 0, '{}')")
    assert isinstance(info.value, DatabaseBusy)
    assert db.query("SELECT * FROM job_events") == []  # reads go on (WAL)
    other.execute("ROLLBACK")
    other.close()
    assert db.execute("INSERT INTO job_events VALUES ('j', 1, 0, 'QUEUED', 'state', '', 0, '{}', 0, '{}')") == 1


FULL_FILESYSTEM = """
import subprocess, sys, tempfile
from pathlib import Path
from adaptgate.training.db.database import Database
mount = Path(tempfile.mkdtemp())
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], check=True)
db = Database(mount / "a.db")
try:
    for i in range(100_000):
        db.execute("INSERT INTO job_events VALUES (?, 1, 0, 'QUEUED', 'state', ?, 0, '{}', 0, '{}')", (f"j{i}", "x" * 500))
except Exception as exc:
    print(type(exc).__name__, exc, sep=": ")
print(len(db.query("SELECT job_id FROM job_events")) > 0)
"""


def test_a_really_full_filesystem_is_the_same_clear_error(tmp_path: Path) -> None:
    """The same on a real ENOSPC: a 192 KiB tmpfs in a private mount namespace (skipped where that is not allowed)."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("unprivileged mount namespaces are not available here")
    done = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", FULL_FILESYSTEM], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("DatabaseFull: the job database cannot be written because the disk is full"), first
    assert second == "True"  # what was committed before is still readable


# ----- PostgreSQL: the same failures, by SQLSTATE, on a real server ---------------------------------


def test_an_unreachable_postgres_server_is_a_clear_error_naming_it_but_not_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(DatabaseUnavailable) as info:
        Database(f"postgresql://adaptgate:s3cret-pw@127.0.0.1:{port}/jobs")
    message = info.value.message
    assert f"the job database at 127.0.0.1:{port} cannot be reached; check that PostgreSQL is running there" in message
    assert isinstance(info.value, Unavailable)
    assert "s3cret-pw" not in message and "s3cret-pw" not in caplog.text


def test_a_server_that_stops_is_a_clear_error_and_is_used_again_once_back() -> None:
    bindir = binaries()
    if bindir is None:
        pytest.skip(NOT_INSTALLED)
    server = PostgresServer(bindir).start()
    try:
        db = Database(server.url)
        store = JobStore(db)
        store.insert(JobRecord.new("acme", JobSpec("ds-1", "spam", method="head")))
        server.halt(fast=True)
        with pytest.raises(DatabaseUnavailable, match=f"the job database at 127.0.0.1:{server.port} cannot be reached"):
            store.list_jobs(None)
        server.start()
        assert len(store.list_jobs(None)) == 1  # the pool replaced its dead connections
        db.close()
    finally:
        server.stop()


def test_connections_the_server_ended_are_replaced_without_an_error(pg_database_url: str) -> None:
    db = Database(pg_database_url)
    assert db.query_one("SELECT 1") == (1,)
    killer = psycopg.connect(pg_database_url, autocommit=True)
    killer.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    killer.close()
    assert db.query_one("SELECT 1") == (1,)
    db.close()


def test_a_postgres_lock_held_beyond_the_busy_timeout_is_a_clear_error(pg_database_url: str) -> None:
    db = Database(pg_database_url, busy_timeout_s=0.2)
    other = psycopg.connect(pg_database_url)
    other.execute("LOCK TABLE job_events IN EXCLUSIVE MODE")  # writers wait, readers do not
    insert = "INSERT INTO job_events VALUES ('j', 1, 0, 'QUEUED', 'state', '', 0, '{}', 0, '{}')"
    with pytest.raises(DatabaseBusy, match=r"the job database is locked by another process \(waited 0.2 s\); try again shortly"):
        db.execute(insert)
    assert db.query("SELECT * FROM job_events") == []
    other.rollback()
    other.close()
    assert db.execute(insert) == 1
    db.close()


def test_a_read_only_postgres_is_a_clear_error(pg_database_url: str) -> None:
    Database(pg_database_url).close()  # migrated
    db = Database(pg_database_url + "?options=-c%20default_transaction_read_only%3Don")
    with pytest.raises(DatabaseIOError, match=r"the job database at 127.0.0.1:\d+ is read-only"):
        db.execute("INSERT INTO job_events VALUES ('j', 1, 0, 'QUEUED', 'state', '', 0, '{}', 0, '{}')")
    db.close()


POSTGRES_ERRORS: dict[str, type | None] = {
    "53100": DatabaseFull, "55P03": DatabaseBusy, "40P01": DatabaseBusy, "40001": DatabaseBusy,
    "25006": DatabaseIOError, "08006": DatabaseUnavailable, "08001": DatabaseUnavailable, "57P01": DatabaseUnavailable,
    "57P02": DatabaseUnavailable, "57P03": DatabaseUnavailable, "42P01": None, "23505": None,
}


def test_postgres_failures_by_sqlstate(pg_database_url: str) -> None:
    """Every row of the table; anything else (a bug in our SQL) stays an internal error."""
    db = Database(pg_database_url)
    for sqlstate, expected in POSTGRES_ERRORS.items():
        make = postgres_failure(psycopg.errors.lookup(sqlstate)("x"))
        assert (make is None) if expected is None else type(make(db)) is expected, sqlstate  # type: ignore[misc]
    assert postgres_failure(psycopg.OperationalError("connection failed")) is not None  # no SQLSTATE: cannot connect
    db.close()
