"""The job database's schema is made by its migrations, on both backends, and older files are adopted in place."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.config import Config

from adaptgate.training.db.database import MIGRATIONS, Database
from adaptgate.training.db.schema import metadata
from adaptgate.training.jobs.records import JobState
from adaptgate.training.jobs.store import JobStore

# The schema releases before migrations created with raw SQL; `LATER` marks the columns added later,
# which a file from the first release does not have.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, rows INTEGER NOT NULL, label_counts TEXT NOT NULL,
    warnings TEXT NOT NULL, created_at REAL NOT NULL, size_bytes INTEGER NOT NULL, path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS datasets_tenant ON datasets (tenant, created_at);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, dataset_id TEXT NOT NULL, adapter_name TEXT NOT NULL,
    method TEXT NOT NULL, alias TEXT NOT NULL, validation_fraction REAL NOT NULL, epochs INTEGER NOT NULL,
    learning_rate REAL NOT NULL, seed INTEGER NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL,
    adapter_ref TEXT NOT NULL, progress REAL NOT NULL, metrics TEXT NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL{jobs_later}
);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, state);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, state TEXT NOT NULL, kind TEXT NOT NULL,
    message TEXT NOT NULL, progress REAL NOT NULL, metrics TEXT NOT NULL, eta_seconds REAL NOT NULL{events_later},
    PRIMARY KEY (job_id, seq)
);
INSERT INTO datasets VALUES ('ds-1', 'acme', 'd', 8, '{{"a": 4, "b": 4}}', '[]', 1.0, 120, 'acme/ds-1.jsonl');
INSERT INTO jobs (id, tenant, dataset_id, adapter_name, method, alias, validation_fraction, epochs, learning_rate,
    seed, state, error, adapter_ref, progress, metrics, created_at, updated_at)
VALUES ('job-old', 'acme', 'ds-1', 'spam', 'lora', 'prod', 0.2, 3, 0.001, 7, 'RUNNING', '', '', 0.5,
    '{{"accuracy": 0.75}}', 1.0, 2.0);
INSERT INTO job_events (job_id, seq, time, state, kind, message, progress, metrics, eta_seconds)
VALUES ('job-old', 1, 1.0, 'QUEUED', 'state', 'queued', 0, '{{}}', 0);
"""
LATER = {
    "first release": ("", ""),
    "last release": (
        ", options TEXT NOT NULL DEFAULT '{}', details TEXT NOT NULL DEFAULT '{}'", ", details TEXT NOT NULL DEFAULT '{}'"
    ),
}


def head() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return str(ScriptDirectory.from_config(config).get_current_head())


def version(db: Database) -> str:
    return str(db.query_one("SELECT version_num FROM alembic_version")[0])  # type: ignore[index]


@pytest.mark.parametrize("release", list(LATER))
def test_a_file_from_an_older_release_is_upgraded_in_place(tmp_path: Path, release: str) -> None:
    path = tmp_path / "adaptgate.db"
    jobs_later, events_later = LATER[release]
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA.format(jobs_later=jobs_later, events_later=events_later))
    conn.close()

    db = Database(path)
    columns = {r[1] for r in db.query("PRAGMA table_info(jobs)")}
    assert {"options", "details", "owner", "lease_expires_at"} <= columns
    assert "details" in {r[1] for r in db.query("PRAGMA table_info(job_events)")}
    assert version(db) == head()
    store = JobStore(db)
    job = store.get("job-old")
    assert job is not None
    assert (job.tenant, job.method, job.alias, job.epochs, job.seed, job.state, job.metrics, job.details) == (
        "acme", "lora", "prod", 3, 7, JobState.RUNNING, {"accuracy": 0.75}, {})
    assert [e.message for e in store.events_after("job-old", 0)] == ["queued"]
    assert store.lease("job-old") is not None and store.lease("job-old")[0] == ""  # type: ignore[index]
    assert [j.id for j in JobStore(db, "replica-a").claim()] == ["job-old"]  # an old row: any replica may take it
    assert db.query_one("SELECT rows, size_bytes FROM datasets WHERE id = 'ds-1'") == (8, 120)
    db.close()
    assert version(Database(path)) == head()  # opening again changes nothing


def test_the_schema_is_made_by_the_migrations_and_matches_schema_py(db: Database) -> None:
    assert version(db) == head() == "0002"
    with db.transaction() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []
    assert {"datasets", "jobs", "job_events"} <= set(sa.inspect(db._backend.engine).get_table_names())


def test_replicas_opening_a_new_postgres_database_together_migrate_it_once(pg_database_url: str) -> None:
    """Each replica upgrades at open; the advisory lock makes the others wait and then find it at head."""
    start, opened, errors = threading.Barrier(4), [], []

    def open_one() -> None:
        start.wait(10)
        try:
            opened.append(Database(pg_database_url))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(opened) == 4
    assert [version(db) for db in opened] == [head()] * 4
    for db in opened:
        db.close()
