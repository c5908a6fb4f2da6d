"""Jobs and their events in the job database: a job row and the event that changed it land together.

Jobs are owned through leases, so control replicas sharing one database never drive the same job:
the row names its `owner` and when the lease ends (`lease_expires_at`, by the database's clock, so
replicas' clocks never matter). The owner renews its leases; every write it makes for a job is fenced
by them (a write for a job it no longer holds raises `LeaseLost` and writes nothing); a job whose
lease ran out, or that its owner released, is taken over by whichever replica claims it first.
A store with the default owner '' is a single replica's: it writes the jobs it made as before.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from adaptgate.errors import Unavailable
from adaptgate.training.db.database import Database
from adaptgate.training.db.schema import job_events, jobs
from adaptgate.training.jobs.records import ACTIVE_STATES, OPTION_FIELDS, JobEvent, JobRecord, JobState

JOB_COLUMNS = (
    "id", "tenant", "dataset_id", "adapter_name", "method", "alias", "validation_fraction", "epochs",
    "learning_rate", "seed", "state", "error", "adapter_ref", "progress", "metrics", "created_at", "updated_at",
    "options", "details",
)
MUTABLE_COLUMNS = ("state", "error", "adapter_ref", "progress", "metrics", "updated_at", "details")
ACTIVE = jobs.c.state.in_([s.value for s in ACTIVE_STATES])
ADMISSION = "adaptgate job admission"  # submits take turns on it: a count and its insert are one step
# Called with (the tenant's active jobs, the server's active jobs) before an insert; raises to refuse it.
Admit = Callable[[int, int], None]


class LeaseLost(Unavailable):
    """The job is no longer this replica's (another took it over, or it was ended elsewhere): stop driving it."""


def _job_values(record: JobRecord, columns: Sequence[str]) -> dict[str, Any]:
    values = {
        **record.__dict__, "state": record.state.value, "metrics": json.dumps(record.metrics),
        "options": json.dumps(record.options), "details": json.dumps(record.details),
    }
    return {c: values[c] for c in columns}


def _job(row: Mapping[str, Any]) -> JobRecord:
    fields = {c: row[c] for c in JOB_COLUMNS if c not in ("options", "details")}
    fields["state"] = JobState(row["state"])
    fields["metrics"] = json.loads(row["metrics"])
    options = json.loads(row["options"] or "{}")
    fields.update({name: options[name] for name in OPTION_FIELDS if name in options})
    fields["details"] = json.loads(row["details"] or "{}")
    return JobRecord(**fields)


def _event(row: Mapping[str, Any]) -> JobEvent:
    return JobEvent(
        job_id=row["job_id"], seq=row["seq"], time=row["time"], state=JobState(row["state"]), kind=row["kind"],
        message=row["message"], progress=row["progress"], metrics=json.loads(row["metrics"]),
        eta_seconds=row["eta_seconds"], details=json.loads(row["details"] or "{}"),
    )


def _jobs(result: sa.CursorResult[Any]) -> list[JobRecord]:
    return sorted((_job(row) for row in result.mappings()), key=lambda r: (r.created_at, r.id))


class JobStore:
    def __init__(self, db: Database, owner: str = "", lease_seconds: float = 30.0) -> None:
        """`owner` names this replica in the leases it takes; a lease lasts `lease_seconds` unless renewed."""
        self.db = db
        self.owner = owner
        self.lease_seconds = lease_seconds

    def _lease_end(self) -> sa.ColumnElement[float]:
        return self.db.now_sql() + self.lease_seconds

    # ----- writes ---------------------------------------------------------------------------------

    def insert(self, record: JobRecord, *events: JobEvent, admit: Admit | None = None) -> None:
        """The job (leased to this store's owner) and its first events, after `admit` saw the counts in
        the same transaction: two concurrent submits, on any replicas, cannot both take the last place."""
        with self.db.transaction() as conn:
            if admit is not None:
                self.db.take_turns(conn, ADMISSION)
                admit(*self._active_counts(conn, record.tenant))
            values = _job_values(record, JOB_COLUMNS)
            conn.execute(jobs.insert().values(**values, owner=self.owner, lease_expires_at=self._lease_end()))
            for event in events:
                self._append(conn, event)

    @staticmethod
    def _active_counts(conn: Connection, tenant: str) -> tuple[int, int]:
        mine = sa.func.coalesce(sa.func.sum(sa.case((jobs.c.tenant == tenant, 1), else_=0)), 0)
        row = conn.execute(sa.select(sa.func.count(), mine).select_from(jobs).where(ACTIVE)).one()
        return int(row[1]), int(row[0])

    def save(self, record: JobRecord, event: JobEvent) -> JobEvent:
        """Update the job's mutable fields and append `event`; returns the event with its seq.
        Fenced: raises LeaseLost, writing nothing, unless this owner still holds the active job."""
        with self.db.transaction() as conn:
            self._update(conn, record)
            return self._append(conn, event)

    def save_row(self, record: JobRecord) -> None:
        """The job's mutable fields without an event: the smallest write, for when the full one was
        refused. Fenced like `save`."""
        with self.db.transaction() as conn:
            self._update(conn, record)

    def _update(self, conn: Connection, record: JobRecord) -> None:
        held = sa.and_(jobs.c.id == record.id, jobs.c.owner == self.owner, ACTIVE)
        if conn.execute(jobs.update().where(held).values(**_job_values(record, MUTABLE_COLUMNS))).rowcount == 0:
            raise self._lost(conn, record.id)

    def _lost(self, conn: Connection, job_id: str) -> LeaseLost:
        row = conn.execute(sa.select(jobs.c.owner, jobs.c.state).where(jobs.c.id == job_id)).first()
        if row is None:
            return LeaseLost(f"job {job_id} is not in the job database; replica {self.owner!r} stops running it")
        if JobState(row.state).terminal:
            return LeaseLost(f"job {job_id} was ended elsewhere ({row.state}); replica {self.owner!r} stops running it")
        return LeaseLost(f"job {job_id} is now run by replica {row.owner!r}; replica {self.owner!r} stops running it")

    def cancel(self, record: JobRecord, event: JobEvent) -> bool:
        """Ends a job whichever replica drives it (not fenced): writes `record`'s fields and `event` if
        the job is still active, and returns whether it did. Its owner's next fenced write or renewal
        then finds it ended and stops its run."""
        with self.db.transaction() as conn:
            still_active = sa.and_(jobs.c.id == record.id, ACTIVE)
            if conn.execute(jobs.update().where(still_active).values(**_job_values(record, MUTABLE_COLUMNS))).rowcount == 0:
                return False
            self._append(conn, event)
            return True

    def _append(self, conn: Connection, event: JobEvent) -> JobEvent:
        """The job's next seq, computed and taken in one statement; appends to one job take turns."""
        self.db.take_turns(conn, f"adaptgate job events {event.job_id}")
        seq = (
            sa.select(sa.func.coalesce(sa.func.max(job_events.c.seq), 0) + 1)
            .where(job_events.c.job_id == event.job_id)
            .scalar_subquery()
        )
        insert = job_events.insert().values(
            job_id=event.job_id, seq=seq, time=event.time, state=event.state.value, kind=event.kind,
            message=event.message, progress=event.progress, metrics=json.dumps(event.metrics),
            eta_seconds=event.eta_seconds, details=json.dumps(event.details),
        )
        event.seq = int(conn.execute(insert.returning(job_events.c.seq)).scalar_one())
        return event

    # ----- leases ---------------------------------------------------------------------------------

    def renew(self, job_ids: Sequence[str]) -> set[str]:
        """Extends the leases this owner still holds on active jobs; returns those ids. A missing id
        was taken over or ended elsewhere: its run here must stop."""
        if not job_ids:
            return set()
        held = sa.and_(jobs.c.id.in_(list(job_ids)), jobs.c.owner == self.owner, ACTIVE)
        statement = jobs.update().where(held).values(lease_expires_at=self._lease_end()).returning(jobs.c.id)
        with self.db.transaction() as conn:
            return set(conn.execute(statement).scalars())

    def claim(self, job_ids: Sequence[str] | None = None, *, expired_only: bool = True) -> list[JobRecord]:
        """Takes the active jobs whose lease ran out (or that no replica owns), or with `expired_only`
        False every active job (a single replica restarting), optionally only `job_ids`; returns them.
        One statement: of replicas claiming at once, each job goes to exactly one."""
        where = [ACTIVE]
        if expired_only:
            where.append(sa.or_(jobs.c.owner == "", jobs.c.lease_expires_at <= self.db.now_sql()))
        if job_ids is not None:
            where.append(jobs.c.id.in_(list(job_ids)))
        statement = (
            jobs.update().where(*where).values(owner=self.owner, lease_expires_at=self._lease_end()).returning(*jobs.c)
        )
        with self.db.transaction() as conn:
            return _jobs(conn.execute(statement))

    def release(self, job_ids: Sequence[str]) -> None:
        """Ends this owner's leases on `job_ids` now (a graceful stop): another replica may take them at once."""
        if not job_ids:
            return
        mine = sa.and_(jobs.c.id.in_(list(job_ids)), jobs.c.owner == self.owner)
        self.db.execute(jobs.update().where(mine).values(lease_expires_at=self.db.now_sql()))

    def lease(self, job_id: str) -> tuple[str, float] | None:
        """(owner, seconds until the lease ends by the database's clock; negative once it has), or None."""
        remaining = jobs.c.lease_expires_at - self.db.now_sql()
        row = self.db.query_one(sa.select(jobs.c.owner, remaining).where(jobs.c.id == job_id))
        return (str(row[0]), float(row[1])) if row is not None else None

    # ----- reads ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        row = self.db.query_one(sa.select(jobs).where(jobs.c.id == job_id))
        return _job(row._mapping) if row is not None else None

    def list_jobs(self, tenant: str | None) -> list[JobRecord]:
        statement = sa.select(jobs).order_by(jobs.c.created_at, jobs.c.id)
        if tenant is not None:
            statement = statement.where(jobs.c.tenant == tenant)
        return [_job(r._mapping) for r in self.db.query(statement)]

    def unfinished(self) -> list[JobRecord]:
        statement = sa.select(jobs).where(ACTIVE).order_by(jobs.c.created_at, jobs.c.id)
        return [_job(r._mapping) for r in self.db.query(statement)]

    def counts_by_state(self) -> dict[str, int]:
        counts = {s.value: 0 for s in JobState}
        for state, n in self.db.query(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)):
            counts[state] = int(n)
        return counts

    def events_after(self, job_id: str, seq: int) -> list[JobEvent]:
        statement = (
            sa.select(job_events).where(job_events.c.job_id == job_id, job_events.c.seq > seq).order_by(job_events.c.seq)
        )
        return [_event(r._mapping) for r in self.db.query(statement)]
