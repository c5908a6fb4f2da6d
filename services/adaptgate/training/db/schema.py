"""The job database's tables, for SQLite and PostgreSQL alike: what the stores' SQL is written against.

This is the schema at the newest migration (training/db/migrations); a change here needs a migration
that makes it, and tests/unit/training/test_migrations.py checks that the two agree on both backends.

Types are chosen per backend where the two differ: SQLite keeps the INTEGER and REAL columns the
first release created (its integers are 64-bit and its reals double already); PostgreSQL gets BIGINT
(a dataset may pass 2 GiB) and DOUBLE PRECISION (epoch seconds need more than a 4-byte REAL).
"""

from __future__ import annotations

import sqlalchemy as sa

INT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
EMPTY_JSON = sa.text("'{}'")

metadata = sa.MetaData()

datasets = sa.Table(
    "datasets", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("rows", INT, nullable=False),
    sa.Column("label_counts", sa.Text, nullable=False),
    sa.Column("warnings", sa.Text, nullable=False),
    sa.Column("created_at", REAL, nullable=False),
    sa.Column("size_bytes", INT, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Index("datasets_tenant", "tenant", "created_at"),
)

jobs = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("dataset_id", sa.Text, nullable=False),
    sa.Column("adapter_name", sa.Text, nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("alias", sa.Text, nullable=False),
    sa.Column("validation_fraction", REAL, nullable=False),
    sa.Column("epochs", INT, nullable=False),
    sa.Column("learning_rate", REAL, nullable=False),
    sa.Column("seed", INT, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("adapter_ref", sa.Text, nullable=False),
    sa.Column("progress", REAL, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("created_at", REAL, nullable=False),
    sa.Column("updated_at", REAL, nullable=False),
    sa.Column("options", sa.Text, nullable=False, server_default=EMPTY_JSON),
    sa.Column("details", sa.Text, nullable=False, server_default=EMPTY_JSON),
    # The replica that runs the job, and until when (the database's clock, epoch seconds): a job
    # whose lease ran out may be taken over by another replica. '' and 0: any replica may take it.
    sa.Column("owner", sa.Text, nullable=False, server_default=sa.text("''")),
    sa.Column("lease_expires_at", REAL, nullable=False, server_default=sa.text("0")),
    sa.Index("jobs_tenant", "tenant", "state"),
    sa.Index("jobs_lease", "state", "lease_expires_at"),
)

job_events = sa.Table(
    "job_events", metadata,
    sa.Column("job_id", sa.Text, primary_key=True),
    sa.Column("seq", INT, primary_key=True, autoincrement=False),
    sa.Column("time", REAL, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("progress", REAL, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("eta_seconds", REAL, nullable=False),
    sa.Column("details", sa.Text, nullable=False, server_default=EMPTY_JSON),
)
