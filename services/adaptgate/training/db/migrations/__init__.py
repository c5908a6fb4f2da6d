"""Alembic migrations of the job database (see db/database.py: they run when a Database is opened)."""
