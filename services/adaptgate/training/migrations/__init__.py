"""Alembic migrations of the job database (see database.py: they run when a Database is opened)."""
