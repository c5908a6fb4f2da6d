"""The one SQLite file that keeps datasets, jobs and job events across gateway restarts.

SQLite is the embedded default (DESIGN: "job records: SQLite file"); one control replica owns
it. The connection is shared by the event loop and worker threads, so every statement runs
under one lock: statements are tiny, and a single lock cannot deadlock or interleave writes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


class Database:
    """A locked SQLite connection in WAL mode; the stores write their own SQL through it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=5000")
        self._conn.executescript(SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Several statements that land together or not at all (a job update and its event)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, params: Params = ()) -> int:
        """One write statement; returns the number of rows it changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def query(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
