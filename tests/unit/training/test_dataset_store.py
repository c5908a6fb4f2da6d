from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptgate.errors import InvalidArgument, InvalidDataset, NotFound
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database

from .conftest import jsonl, separable_rows


@pytest.fixture
def store(tmp_path: Path, db: Database) -> DatasetStore:
    """On each backend (conftest's `db`: SQLite and PostgreSQL)."""
    return DatasetStore(tmp_path / "datasets", db)


def test_create_writes_normalized_jsonl_and_record(store: DatasetStore) -> None:
    data = b"body,kind\nhello,a\nworld,b\nfoo,a\nbar,b\n"
    record = store.create("acme", "greetings", "csv", data, "body", "kind")
    assert record.id.startswith("ds-") and len(record.id) == 15
    assert (record.tenant, record.name, record.rows, record.size_bytes) == ("acme", "greetings", 4, len(data))
    assert record.label_counts == {"a": 2, "b": 2}
    path = Path(store.root.path) / "acme" / f"{record.id}.jsonl"
    assert json.loads(path.read_text().split("\n")[0]) == {"text": "hello", "label": "a"}
    assert store.load(record) == (["hello", "world", "foo", "bar"], ["a", "b", "a", "b"])
    assert not list(path.parent.glob("*.tmp"))


def test_other_tenant_gets_the_same_not_found_as_missing(store: DatasetStore) -> None:
    record = store.create("acme", "d", "jsonl", jsonl(separable_rows(3)), "text", "label")
    assert store.get("acme", record.id) == record
    assert store.get(None, record.id) == record
    with pytest.raises(NotFound) as other:
        store.get("globex", record.id)
    with pytest.raises(NotFound) as missing:
        store.get("globex", "ds-000000000000")
    assert other.value.message == f"dataset '{record.id}' not found"
    assert missing.value.message == "dataset 'ds-000000000000' not found"


def test_list_is_scoped_by_tenant(store: DatasetStore) -> None:
    a = store.create("acme", "a", "jsonl", jsonl(separable_rows(3)))
    b = store.create("globex", "b", "jsonl", jsonl(separable_rows(3)))
    assert [r.id for r in store.list("acme")] == [a.id]
    assert {r.id for r in store.list(None)} == {a.id, b.id}


def test_invalid_upload_leaves_nothing(store: DatasetStore) -> None:
    with pytest.raises(InvalidDataset):
        store.create("acme", "bad", "jsonl", b'{"text": "x"}\n')
    assert store.list(None) == []
    assert not (Path(store.root.path) / "acme").exists() or not any((Path(store.root.path) / "acme").iterdir())


@pytest.mark.parametrize("name", ["", "   ", "x" * 129])
def test_bad_names(store: DatasetStore, name: str) -> None:
    with pytest.raises(InvalidArgument):
        store.create("acme", name, "jsonl", jsonl(separable_rows(3)))


def test_path_unsafe_tenant_refused(store: DatasetStore) -> None:
    with pytest.raises(InvalidArgument):
        store.create("../evil", "d", "jsonl", jsonl(separable_rows(3)))


def test_records_survive_reopening_the_database(tmp_path: Path, db_url: str) -> None:
    first = DatasetStore(tmp_path / "datasets", Database(db_url))
    record = first.create("acme", "d", "jsonl", jsonl(separable_rows(3) + separable_rows(3)))
    first.db.close()
    second = DatasetStore(tmp_path / "datasets", Database(db_url))
    again = second.get("acme", record.id)
    assert again == record and again.warnings == record.warnings and again.warnings
    assert second.load(again)[1][:2] == ["animal", "money"]


def test_a_dataset_stored_by_one_replica_is_read_and_deleted_by_another(tmp_path: Path, db: Database) -> None:
    """Control replicas share the database and the storage URI: a dataset uploaded to one trains on another."""
    uri = (tmp_path / "shared").as_uri()  # file://…, as a storage URI names it
    first, second = DatasetStore(uri, db), DatasetStore(uri, db)
    record = first.create("acme", "d", "jsonl", jsonl(separable_rows(3)), "text", "label")
    texts, labels = second.load(second.get("acme", record.id))
    assert len(texts) == 6 and set(labels) == {"animal", "money"}
    assert (tmp_path / "shared" / "acme" / f"{record.id}.jsonl").is_file()
    second.delete("acme", record.id)
    assert not (tmp_path / "shared" / "acme" / f"{record.id}.jsonl").exists()
    with pytest.raises(NotFound):
        first.get("acme", record.id)
