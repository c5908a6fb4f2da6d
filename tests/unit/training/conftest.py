"""Fixtures for training tests: a tiny random BERT (packaged tokenizer) and small datasets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptgate.training.db.database import Database


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_bert_dir: Path) -> Path:
    """The shared tiny random BERT (tests/conftest.py) under the name these tests use."""
    return tiny_bert_dir


def separable_rows(per_class: int = 30) -> list[dict[str, str]]:
    """Two classes with disjoint vocabularies: any sane encoder plus a linear head separates them."""
    animals = ["cat", "dog", "horse", "rabbit", "lion", "tiger", "zebra", "mouse"]
    money = ["price", "stock", "market", "bank", "loan", "invoice", "budget", "tax"]
    rows = []
    for i in range(per_class):
        rows.append({"text": f"the {animals[i % 8]} and the {animals[(i * 3 + 1) % 8]} sleep {i}", "label": "animal"})
        rows.append({"text": f"{money[i % 8]} {money[(i * 5 + 2) % 8]} report {i}", "label": "money"})
    return rows


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job database on each backend: a SQLite file, and a fresh database on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return str(request.getfixturevalue("pg_database_url"))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.close()
