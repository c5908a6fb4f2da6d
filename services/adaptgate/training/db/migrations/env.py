"""Alembic's entry point: migrates the connection `Database` hands over, inside its transaction.

There is no alembic.ini: `database.upgrade_schema` builds the configuration and passes the open
connection in `config.attributes["connection"]`, already holding the lock that keeps replicas from
migrating at the same time.
"""

from __future__ import annotations

from alembic import context

from adaptgate.training.db.schema import metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("the job database migrates itself when it is opened (adaptgate.training.db.database.Database)")
    context.configure(
        connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite"
    )
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
