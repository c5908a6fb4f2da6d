"""Job leases: which control replica runs a job (`owner`) and until when (`lease_expires_at`, the
database's clock in epoch seconds). Rows written before have '' and 0: any replica may take them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

REAL = sa.Double().with_variant(sa.REAL(), "sqlite")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.Text, nullable=False, server_default=sa.text("''")))
    op.add_column("jobs", sa.Column("lease_expires_at", REAL, nullable=False, server_default=sa.text("0")))
    op.create_index("jobs_lease", "jobs", ["state", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("jobs_lease", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("owner")
