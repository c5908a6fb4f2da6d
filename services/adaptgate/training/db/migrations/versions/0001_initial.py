"""The first schema: datasets, jobs and job events; adopts a database made before migrations existed.

Releases before Alembic created the tables with CREATE TABLE IF NOT EXISTS and added later columns
(jobs.options, jobs.details, job_events.details) on open. Such a file has no alembic_version table,
so this revision runs on it too: it creates only what is missing, adds missing columns (each has a
default, so existing rows get it) and keeps every row.

The tables are spelt out here, not imported from schema.py: a revision describes the schema as it
was at that revision, whatever schema.py says later.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

INT = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
REAL = sa.Double().with_variant(sa.REAL(), "sqlite")
EMPTY_JSON = sa.text("'{}'")


def tables() -> list[sa.Table]:
    metadata = sa.MetaData()
    return [
        sa.Table(
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
        ),
        sa.Table(
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
            sa.Index("jobs_tenant", "tenant", "state"),
        ),
        sa.Table(
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
        ),
    ]


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    existing = set(inspector.get_table_names())
    for table in tables():
        if table.name not in existing:
            table.create(bind)
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:  # only the later columns can be missing: each has a default
                op.add_column(table.name, column._copy())
        indexes = {i["name"] for i in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if index.name not in indexes:
                index.create(bind)


def downgrade() -> None:
    for table in reversed(tables()):
        op.drop_table(table.name)
