"""Per-tenant storage quotas (RELIABILITY 38): bytes across adapter versions and datasets, and the
number of each, checked at publish (uploads and finetuning jobs alike) and at dataset creation,
consistent under concurrent writes, freed by deletes; refusals name the quota, the use and the limit."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.model import load_base_model
from adaptgate.errors import QuotaExceeded
from adaptgate.quotas import StorageLimits, StorageQuotas, Usage, describe_bytes
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database
from tests.unit.peft_adapters import adapter_files, make_peft_adapter
from tests.unit.training.conftest import jsonl, separable_rows

DATA = jsonl(separable_rows(4))


@pytest.fixture(scope="module")
def base(tiny_bert_dir: Path):
    return load_base_model(tiny_bert_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def files(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("quota-adapter")
    make_peft_adapter(tiny_bert_dir, out, num_labels=2, rank=4, seed=17)
    return adapter_files(out)


def adapter_bytes(files: dict[str, bytes]) -> int:
    return sum(len(v) for v in files.values())


class Stores:
    def __init__(self, tmp_path: Path, base, limits: StorageLimits) -> None:
        self.quotas = StorageQuotas(limits)
        self.adapters = AdapterStore(tmp_path / "adapters", AdapterValidator(base.spec, 8, 8), self.quotas)
        self.datasets = DatasetStore(tmp_path / "datasets", Database(tmp_path / "db.sqlite"), quotas=self.quotas)


def test_adapter_version_quota_names_the_quota_the_use_and_the_limit(tmp_path: Path, base, files) -> None:
    s = Stores(tmp_path, base, StorageLimits(max_adapter_versions_per_tenant=2))
    s.adapters.publish("acme", "spam", files)
    s.adapters.publish("acme", "eggs", files)
    for source in ("upload", "job:job-1"):  # a finetuning job publishes through the same door
        with pytest.raises(QuotaExceeded) as refused:
            s.adapters.publish("acme", "spam", files, source=source)
        message = refused.value.message
        assert "tenant 'acme'" in message and "(max_adapter_versions_per_tenant)" in message
        assert "uses 2 of 2 adapter versions, and this adds 1" in message and "DeleteAdapter" in message
    assert [r.version for r in s.adapters.list("acme")] == [1, 1]
    assert not any((s.adapters.root / ".staging").iterdir())
    assert s.adapters.publish("globex", "spam", files).version == 1, "the quota is per tenant"


def test_storage_bytes_count_adapter_versions_and_datasets_together(tmp_path: Path, base, files) -> None:
    size = adapter_bytes(files)
    s = Stores(tmp_path, base, StorageLimits(max_storage_bytes_per_tenant=size + len(DATA) + 100))
    s.adapters.publish("acme", "spam", files)
    s.datasets.create("acme", "d", "jsonl", DATA)
    assert s.quotas.usage("acme") == Usage(bytes=size + len(DATA), adapter_versions=1, datasets=1)
    with pytest.raises(QuotaExceeded, match=r"storage quota \(max_storage_bytes_per_tenant\): it uses "):
        s.datasets.create("acme", "again", "jsonl", DATA)
    with pytest.raises(QuotaExceeded) as refused:
        s.adapters.publish("acme", "spam", files)
    used, limit = describe_bytes(size + len(DATA)), describe_bytes(size + len(DATA) + 100)
    assert f"it uses {used} of {limit}, and this adds {describe_bytes(size)}" in refused.value.message
    assert len(s.datasets.list("acme")) == 1 and not any((Path(s.datasets.root.path) / "acme").glob("*.tmp"))
    assert len(list((Path(s.datasets.root.path) / "acme").iterdir())) == 1, "a refused dataset leaves no file"


def test_dataset_count_quota(tmp_path: Path, base) -> None:
    s = Stores(tmp_path, base, StorageLimits(max_datasets_per_tenant=1))
    s.datasets.create("acme", "d", "jsonl", DATA)
    with pytest.raises(QuotaExceeded, match=r"dataset quota \(max_datasets_per_tenant\): it uses 1 of 1 datasets"):
        s.datasets.create("acme", "e", "jsonl", DATA)
    s.datasets.create("globex", "d", "jsonl", DATA)


def test_deleting_frees_quota(tmp_path: Path, base, files) -> None:
    s = Stores(tmp_path, base, StorageLimits(max_adapter_versions_per_tenant=1, max_datasets_per_tenant=1))
    s.adapters.publish("acme", "spam", files)
    dataset = s.datasets.create("acme", "d", "jsonl", DATA)
    with pytest.raises(QuotaExceeded):
        s.adapters.publish("acme", "spam", files)
    with pytest.raises(QuotaExceeded):
        s.datasets.create("acme", "e", "jsonl", DATA)
    s.adapters.delete(AdapterRef("acme", "spam", 1))
    s.datasets.delete("acme", dataset.id)
    assert s.quotas.usage("acme") == Usage()
    assert s.adapters.publish("acme", "spam", files).version == 2
    assert s.datasets.create("acme", "e", "jsonl", DATA).name == "e"


def test_concurrent_writes_never_pass_the_quota(tmp_path: Path, base, files) -> None:
    s = Stores(tmp_path, base, StorageLimits(max_adapter_versions_per_tenant=3))
    start = threading.Barrier(8)

    def publish(i: int) -> bool:
        start.wait(timeout=30)
        try:
            s.adapters.publish("acme", f"a{i % 2}", files)
            return True
        except QuotaExceeded:
            return False

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(publish, range(8)))
    assert outcomes.count(True) == 3
    assert len(s.adapters.list("acme")) == 3


def test_a_server_wide_byte_limit_covers_every_tenant(tmp_path: Path, base, files) -> None:
    s = Stores(tmp_path, base, StorageLimits(max_storage_bytes=adapter_bytes(files) * 3 // 2))
    s.adapters.publish("acme", "spam", files)
    with pytest.raises(QuotaExceeded, match=r"the server has no room under its server-wide storage quota \(max_storage_bytes\)"):
        s.adapters.publish("globex", "spam", files)
