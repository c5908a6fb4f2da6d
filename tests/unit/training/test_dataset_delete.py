"""Deleting a dataset (RELIABILITY 38): the record and the file go, another tenant's dataset looks
missing, and a dataset stays while a queued or running job trains on it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from adaptgate.errors import FailedPrecondition, NotFound
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database
from adaptgate.training.jobs.records import JobEvent, JobRecord, JobSpec, JobState
from adaptgate.training.jobs.store import JobStore

from .conftest import jsonl, separable_rows


@pytest.fixture
def store(tmp_path: Path, db: Database) -> DatasetStore:
    """On each backend (conftest's `db`: SQLite and PostgreSQL)."""
    return DatasetStore(tmp_path / "datasets", db)


def test_delete_returns_the_record_and_removes_the_row_and_the_file(store: DatasetStore) -> None:
    record = store.create("acme", "d", "jsonl", jsonl(separable_rows(3)))
    kept = store.create("acme", "e", "jsonl", jsonl(separable_rows(3)))
    path = Path(store.root.path) / "acme" / f"{record.id}.jsonl"
    assert path.exists()
    assert store.delete("acme", record.id) == record
    assert not path.exists()
    with pytest.raises(NotFound):
        store.get("acme", record.id)
    assert [r.id for r in store.list("acme")] == [kept.id]
    with pytest.raises(NotFound):
        store.delete("acme", record.id)


def test_another_tenants_dataset_is_not_found(store: DatasetStore) -> None:
    record = store.create("acme", "d", "jsonl", jsonl(separable_rows(3)))
    with pytest.raises(NotFound) as other:
        store.delete("globex", record.id)
    assert other.value.message == f"dataset '{record.id}' not found"
    assert store.get("acme", record.id) == record
    assert store.delete(None, record.id) == record  # an admin may


def _set_state(jobs: JobStore, record: JobRecord, state: JobState) -> None:
    record.state = state
    jobs.save(record, JobEvent(record.id, 0, time.time(), state, "state"))


def test_a_dataset_stays_while_a_queued_or_running_job_uses_it(store: DatasetStore) -> None:
    record = store.create("acme", "d", "jsonl", jsonl(separable_rows(3)))
    jobs = JobStore(store.db)
    job = JobRecord.new("acme", JobSpec(dataset_id=record.id, adapter_name="spam", method="head"))
    jobs.insert(job, JobEvent(job.id, 0, time.time(), JobState.QUEUED, "state"))
    for state in (JobState.QUEUED, JobState.RUNNING):
        _set_state(jobs, job, state)
        with pytest.raises(FailedPrecondition, match=f"in use by 1 queued or running job\\(s\\) \\({job.id}\\)"):
            store.delete("acme", record.id)
        assert store.get("acme", record.id) == record
    _set_state(jobs, job, JobState.SUCCEEDED)
    assert store.delete("acme", record.id) == record
