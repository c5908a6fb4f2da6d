"""Jobs and their events in SQLite: a job row and the event that changed it land together."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence

from adaptgate.training.database import Database
from adaptgate.training.job_records import ACTIVE_STATES, OPTION_FIELDS, JobEvent, JobRecord, JobState

JOB_COLUMNS = (
    "id", "tenant", "dataset_id", "adapter_name", "method", "alias", "validation_fraction", "epochs",
    "learning_rate", "seed", "state", "error", "adapter_ref", "progress", "metrics", "created_at", "updated_at",
    "options", "details",
)
MUTABLE_COLUMNS = ("state", "error", "adapter_ref", "progress", "metrics", "updated_at", "details")


def _job_values(record: JobRecord, columns: Sequence[str]) -> list[object]:
    values = {
        **record.__dict__, "state": record.state.value, "metrics": json.dumps(record.metrics),
        "options": json.dumps(record.options), "details": json.dumps(record.details),
    }
    return [values[c] for c in columns]


def _job(row: sqlite3.Row) -> JobRecord:
    fields = {c: row[c] for c in JOB_COLUMNS if c not in ("options", "details")}
    fields["state"] = JobState(row["state"])
    fields["metrics"] = json.loads(row["metrics"])
    options = json.loads(row["options"] or "{}")
    fields.update({name: options[name] for name in OPTION_FIELDS if name in options})
    fields["details"] = json.loads(row["details"] or "{}")
    return JobRecord(**fields)


def _event(row: sqlite3.Row) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"], seq=row["seq"], time=row["time"], state=JobState(row["state"]), kind=row["kind"],
        message=row["message"], progress=row["progress"], metrics=json.loads(row["metrics"]),
        eta_seconds=row["eta_seconds"], details=json.loads(row["details"] or "{}"),
    )


INSERT_EVENT = (
    "INSERT INTO job_events (job_id, seq, time, state, kind, message, progress, metrics, eta_seconds, details)"
    " SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ?, ?, ?, ?, ?, ? FROM job_events WHERE job_id = ? RETURNING seq"
)


ACTIVE = f"state IN ({', '.join(repr(s.value) for s in ACTIVE_STATES)})"
# Called with (the tenant's active jobs, the server's active jobs) before an insert; raises to refuse it.
Admit = Callable[[int, int], None]


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert(self, record: JobRecord, *events: JobEvent, admit: Admit | None = None) -> None:
        """The job and its first events, after `admit` saw the counts in the same transaction: two
        concurrent submits cannot both take the last place."""
        marks = ", ".join("?" for _ in JOB_COLUMNS)
        with self.db.transaction() as conn:
            if admit is not None:
                admit(*self._active_counts(conn, record.tenant))
            conn.execute(f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({marks})", _job_values(record, JOB_COLUMNS))
            for event in events:
                self._append(conn, event)

    @staticmethod
    def _active_counts(conn: sqlite3.Connection, tenant: str) -> tuple[int, int]:
        row = conn.execute(f"SELECT COUNT(*), COALESCE(SUM(tenant = ?), 0) FROM jobs WHERE {ACTIVE}", (tenant,)).fetchone()
        return int(row[1]), int(row[0])

    def save(self, record: JobRecord, event: JobEvent) -> JobEvent:
        """Update the job's mutable fields and append `event`; returns the event with its seq."""
        sets = ", ".join(f"{c} = ?" for c in MUTABLE_COLUMNS)
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*_job_values(record, MUTABLE_COLUMNS), record.id])
            return self._append(conn, event)

    def save_row(self, record: JobRecord) -> None:
        """The job's mutable fields without an event: the smallest write, for when the full one was refused."""
        sets = ", ".join(f"{c} = ?" for c in MUTABLE_COLUMNS)
        self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*_job_values(record, MUTABLE_COLUMNS), record.id])

    @staticmethod
    def _append(conn: sqlite3.Connection, event: JobEvent) -> JobEvent:
        params = (event.job_id, event.time, event.state.value, event.kind, event.message, event.progress,
                  json.dumps(event.metrics), event.eta_seconds, json.dumps(event.details), event.job_id)
        event.seq = int(conn.execute(INSERT_EVENT, params).fetchone()[0])
        return event

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.query_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row is not None else None

    def list_jobs(self, tenant: str | None) -> list[JobRecord]:
        if tenant is None:
            return [_job(r) for r in self.db.query("SELECT * FROM jobs ORDER BY created_at, id")]
        rows = self.db.query("SELECT * FROM jobs WHERE tenant = ? ORDER BY created_at, id", (tenant,))
        return [_job(r) for r in rows]

    def unfinished(self) -> list[JobRecord]:
        return [_job(r) for r in self.db.query(f"SELECT * FROM jobs WHERE {ACTIVE} ORDER BY created_at, id")]

    def counts_by_state(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        for row in self.db.query("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = int(row[1])
        return counts

    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        rows = self.db.query("SELECT * FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq))
        return [_event(r) for r in rows]
