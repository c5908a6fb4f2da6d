"""Uploads, quotas and deletes against a real gateway with small limits (RELIABILITY 36, 38)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from adaptgate.client import Client
from adaptgate.engine.model import packaged_model_dir
from adaptgate.v1 import adapters_pb2, datasets_pb2
from tests.integration.conftest import Gateway, running_gateway
from tests.unit.peft_adapters import make_peft_adapter

pytestmark = pytest.mark.integration
MiB = 1 << 20
FLAGS = (
    "--max-adapter-upload-bytes", str(MiB), "--max-upload-bytes", str(MiB), "--max-adapter-versions-per-tenant", "3",
    "--max-uploads-per-tenant", "1",
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("storage-gateway"), *FLAGS) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MiniLM adapter (r=2 on query/value, about 100 KB), well under the 1 MiB limit."""
    out = tmp_path_factory.mktemp("small-adapter")
    make_peft_adapter(packaged_model_dir(), out, num_labels=2, rank=2, seed=3, targets=["query", "value"])
    return out


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def spool(gateway: Gateway) -> list[Path]:
    return list((gateway.data_dir / "uploads").rglob("*"))


def dataset_bytes(n: int = 4) -> bytes:
    rows = [{"text": f"{word} number {i}", "label": word} for i in range(n) for word in ("cat", "tax")]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def test_uploads_over_the_limit_are_resource_exhausted_and_leave_no_temp_files(gateway: Gateway, adapter: Path, tmp_path: Path) -> None:
    client = Client(gateway.target, "acme-token")
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (big / "adapter_model.safetensors").write_bytes(b"\0" * (2 * MiB))
    error = refused(lambda: client.upload_adapter(big, "big"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 MiB limit (max_adapter_upload_bytes = 1048576 bytes)" in error.details()
    (tmp_path / "big.jsonl").write_bytes(dataset_bytes(20000))
    error = refused(lambda: client.upload_dataset(tmp_path / "big.jsonl"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(max_upload_bytes = 1048576 bytes)" in error.details()
    assert spool(gateway) == []
    assert client.upload_adapter(adapter, "small").ref == "acme/small@v1", "the server serves on"
    client.delete_adapter("small")


def test_delete_a_version_then_the_whole_name(gateway: Gateway, adapter: Path) -> None:
    client = Client(gateway.target, "acme-token")
    first, second = client.upload_adapter(adapter, "gone"), client.upload_adapter(adapter, "gone")
    assert list(client.delete_adapter("gone@v1").deleted) == [first.ref]
    assert refused(lambda: client.classify(["x"], "gone@v1")).code() == grpc.StatusCode.NOT_FOUND
    assert client.classify(["x"], "gone").adapter == second.ref
    assert list(client.delete_adapter("gone").deleted) == [second.ref]
    get = lambda: client.adapters.GetAdapter(adapters_pb2.AdapterRef(ref="gone"), metadata=client.metadata)  # noqa: E731
    assert refused(get).code() == grpc.StatusCode.NOT_FOUND


def test_an_aliased_version_is_refused_until_forced(gateway: Gateway, adapter: Path) -> None:
    client = Client(gateway.target, "acme-token")
    uploaded = client.upload_adapter(adapter, "live", alias="prod")
    assert client.classify(["x"], "live:prod").adapter == uploaded.ref
    error = refused(lambda: client.delete_adapter(uploaded.ref))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "'prod' points at v1" in error.details()
    assert client.classify(["x"], "live:prod").adapter == uploaded.ref, "a refused delete changes nothing"
    deleted = client.delete_adapter(uploaded.ref, force=True)
    assert list(deleted.deleted) == [uploaded.ref] and list(deleted.aliases_removed) == ["prod"]
    assert refused(lambda: client.classify(["x"], "live:prod")).code() == grpc.StatusCode.NOT_FOUND


def test_another_tenants_adapter_and_dataset_cannot_be_deleted(gateway: Gateway, adapter: Path, tmp_path: Path) -> None:
    acme, globex = Client(gateway.target, "acme-token"), Client(gateway.target, "globex-token")
    uploaded = acme.upload_adapter(adapter, "mine")
    (tmp_path / "mine.jsonl").write_bytes(dataset_bytes())
    dataset = acme.upload_dataset(tmp_path / "mine.jsonl")
    for ref in ("acme/mine", "acme/mine@v1", "mine"):
        assert refused(lambda: globex.delete_adapter(ref, force=True)).code() == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: globex.delete_dataset(dataset.id)).code() == grpc.StatusCode.NOT_FOUND
    assert acme.classify(["x"], "mine").adapter == uploaded.ref
    assert list(acme.delete_adapter("mine").deleted) == [uploaded.ref]
    assert acme.delete_dataset(dataset.id).id == dataset.id


def test_delete_a_dataset(gateway: Gateway, tmp_path: Path) -> None:
    client = Client(gateway.target, "acme-token")
    (tmp_path / "pets.jsonl").write_bytes(dataset_bytes())
    dataset = client.upload_dataset(tmp_path / "pets.jsonl")
    deleted = client.delete_dataset(dataset.id)
    assert (deleted.id, deleted.name, deleted.rows) == (dataset.id, "pets", 8)
    get = lambda: client.datasets.GetDataset(datasets_pb2.DatasetRef(id=dataset.id), metadata=client.metadata)  # noqa: E731
    assert refused(get).code() == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: client.delete_dataset(dataset.id)).code() == grpc.StatusCode.NOT_FOUND
    assert not list((gateway.data_dir / "datasets").rglob(f"{dataset.id}*"))


def test_the_quota_names_itself_the_use_and_the_limit_and_a_delete_frees_it(gateway: Gateway, adapter: Path) -> None:
    client = Client(gateway.target, "globex-token")
    for _ in range(3):
        client.upload_adapter(adapter, "many")
    error = refused(lambda: client.upload_adapter(adapter, "many"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'globex' has no room under its adapter-version quota (max_adapter_versions_per_tenant)" in error.details()
    assert "it uses 3 of 3 adapter versions" in error.details()
    client.delete_adapter("many@v1")
    assert client.upload_adapter(adapter, "many").ref == "globex/many@v4"
    client.delete_adapter("many")


def in_flight_uploads(gateway: Gateway) -> float:
    body = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    return float(next(line.split()[-1] for line in body.splitlines() if line.startswith("adaptgate_uploads_in_flight ")))


def test_a_tenant_at_its_upload_limit_is_refused_while_another_tenant_uploads(gateway: Gateway, adapter: Path) -> None:
    acme, globex = Client(gateway.target, "acme-token"), Client(gateway.target, "globex-token")
    release = threading.Event()

    def held() -> Iterator[adapters_pb2.UploadAdapterChunk]:
        yield adapters_pb2.UploadAdapterChunk(name="held")
        for path in sorted(adapter.iterdir()):
            if path.suffix in (".json", ".safetensors"):
                yield adapters_pb2.UploadAdapterChunk(filename=path.name, data=path.read_bytes())
        release.wait(timeout=60)

    first = acme.adapters.UploadAdapter.future(held(), metadata=acme.metadata, timeout=120)
    try:
        deadline = time.monotonic() + 30
        while in_flight_uploads(gateway) < 1:
            assert time.monotonic() < deadline, "the held upload never started"
        error = refused(lambda: acme.upload_adapter(adapter, "second"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_uploads_per_tenant" in error.details()
        assert globex.upload_adapter(adapter, "theirs").ref == "globex/theirs@v1"
    finally:
        release.set()
    assert first.result(timeout=60).ref == "acme/held@v1"
    assert spool(gateway) == []
    acme.delete_adapter("held")
    globex.delete_adapter("theirs")


def test_the_cli_deletes_adapters_and_datasets(gateway: Gateway, adapter: Path, tmp_path: Path) -> None:
    client = Client(gateway.target, "acme-token")
    client.upload_adapter(adapter, "by-cli", alias="prod")
    (tmp_path / "cli.jsonl").write_bytes(dataset_bytes())
    dataset = client.upload_dataset(tmp_path / "cli.jsonl")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "adaptgate.cli", *args, "--server", gateway.target, "--token", "acme-token"]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    refused_run = cli("adapters", "delete", "by-cli")
    assert refused_run.returncode != 0 and "FAILED_PRECONDITION" in refused_run.stderr
    forced = cli("adapters", "delete", "by-cli", "--force")
    assert forced.returncode == 0 and "deleted acme/by-cli@v1 (aliases removed: prod)" in forced.stdout
    removed = cli("datasets", "delete", dataset.id)
    assert removed.returncode == 0 and f"deleted {dataset.id}" in removed.stdout
    assert client.datasets.ListDatasets(datasets_pb2.ListDatasetsRequest(), metadata=client.metadata).datasets == []
