"""The one SQLite file that keeps datasets, jobs and job events across gateway restarts.

SQLite is the embedded default (DESIGN: "job records: SQLite file"); one control replica owns
it. The connection is shared by the event loop and worker threads, so every statement runs
under one lock: statements are tiny, and a single lock cannot deadlock or interleave writes.
A statement can still wait: up to the busy timeout for a lock another process holds. Async code
therefore calls the database through `run`, on the database's own thread, never on the event loop.

SQLite's environmental failures (full disk, a lock held too long, I/O errors) become errors with a
sentence an operator can act on; anything else (a bug in our SQL) stays an internal error.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from adaptgate.errors import AdaptgateError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    rows INTEGER NOT NULL,
    label_counts TEXT NOT NULL,
    warnings TEXT NOT NULL,
    created_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_tenant ON datasets (tenant, created_at);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    dataset_id TEXT NOT NULL,
    adapter_name TEXT NOT NULL,
    method TEXT NOT NULL,
    alias TEXT NOT NULL,
    validation_fraction REAL NOT NULL,
    epochs INTEGER NOT NULL,
    learning_rate REAL NOT NULL,
    seed INTEGER NOT NULL,
    state TEXT NOT NULL,
    error TEXT NOT NULL,
    adapter_ref TEXT NOT NULL,
    progress REAL NOT NULL,
    metrics TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    options TEXT NOT NULL DEFAULT '{}',
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, state);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    state TEXT NOT NULL,
    kind TEXT NOT NULL,
    message TEXT NOT NULL,
    progress REAL NOT NULL,
    metrics TEXT NOT NULL,
    eta_seconds REAL NOT NULL,
    details TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (job_id, seq)
);
"""
# Columns added after the first release: databases made by an older gateway get them on open.
ADDED_COLUMNS = {
    "jobs": {"options": "TEXT NOT NULL DEFAULT '{}'", "details": "TEXT NOT NULL DEFAULT '{}'"},
    "job_events": {"details": "TEXT NOT NULL DEFAULT '{}'"},
}

Params = Sequence[Any]
BUSY_TIMEOUT_S = 5.0


class DatabaseFull(ResourceExhausted):
    """SQLITE_FULL: the volume under the data directory has no space left."""


class DatabaseBusy(Unavailable):
    """SQLITE_BUSY/LOCKED: another process held the database longer than the busy timeout."""


class DatabaseIOError(Unavailable):
    """SQLITE_IOERR/READONLY: the file could not be written at all."""


def _locked(waited: float) -> DatabaseBusy:
    return DatabaseBusy(f"the job database is locked by another process (waited {waited:g} s); try again shortly")


# SQLite's primary result code (the low byte of an extended one) -> the error callers see (given the busy timeout).
FAILURES: dict[int, Callable[[float], AdaptgateError]] = {
    sqlite3.SQLITE_FULL: lambda _: DatabaseFull(
        "the job database cannot be written because the disk is full; free space on the data volume and try again"
    ),
    sqlite3.SQLITE_BUSY: _locked,
    sqlite3.SQLITE_LOCKED: _locked,
    sqlite3.SQLITE_IOERR: lambda _: DatabaseIOError(
        "the job database cannot be written (an I/O error on the data volume); check the volume and try again"
    ),
    sqlite3.SQLITE_READONLY: lambda _: DatabaseIOError(
        "the job database cannot be written (the data volume is read-only); check the volume and try again"
    ),
}


def translated(exc: sqlite3.Error, busy_timeout_s: float) -> BaseException:
    """The error to raise for `exc`: a sentence for environmental failures, `exc` itself for anything else."""
    code = getattr(exc, "sqlite_errorcode", None)
    make = FAILURES.get(code & 0xFF) if code is not None else None
    if make is None:
        return exc
    error = make(busy_timeout_s)
    log.warning("%s (SQLite: %s)", error.message, exc)
    return error


class Database:
    """A locked SQLite connection in WAL mode; the stores write their own SQL through it."""

    def __init__(self, path: Path, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # One thread for async callers: statements are serialized by the lock anyway, and a caller
        # stuck behind another process's lock then never holds a thread of the shared default pool.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptgate-db")
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self._sqlite_errors():
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self._conn.executescript(SCHEMA)
            self._add_columns()

    def _add_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raised = translated(exc, self.busy_timeout_s)
            if raised is exc:
                raise
            raise raised from exc

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the database's thread: the event loop never waits for a lock or the disk."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements that land together or not at all (a job update and its event)."""
        with self._lock, self._sqlite_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            finally:
                self._rollback_if_open()

    def _rollback_if_open(self) -> None:
        """SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR): a second
        ROLLBACK would raise "no transaction is active" and hide the error that matters."""
        if not self._conn.in_transaction:
            return
        try:
            self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.warning("ROLLBACK failed after an earlier error", exc_info=True)

    def execute(self, sql: str, params: Params = ()) -> int:
        """One write statement; returns the number of rows it changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        with self._lock, self._sqlite_errors():
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        with self._lock, self._sqlite_errors():
            return self._conn.execute(sql, params).fetchone()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            self._conn.close()
