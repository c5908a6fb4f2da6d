"""The job database (datasets, jobs, job events) on SQLite or PostgreSQL: its tables and its Alembic migrations."""
