"""Uploads stream to disk under per-tenant and server-wide admission (RELIABILITY 36): memory stays
flat, an upload over its limit is refused at the chunk that crosses it, a tenant over its upload
limits is refused at once while other tenants upload, and nothing is left on disk however an
upload ends."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from adaptgate.adapters.cache import AdapterCache
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.api.adapters import AdaptersServicer
from adaptgate.api.admission import TenantAdmission
from adaptgate.api.auth import Principal, TokenAuthenticator
from adaptgate.api.datasets import DatasetsServicer
from adaptgate.api.rpc import RpcRuntime
from adaptgate.api.uploads import SizeLimit, UploadAdmission, UploadLimits, Uploads
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.model import load_base_model
from adaptgate.errors import UploadsBusy
from adaptgate.metrics import Metrics
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import Database
from adaptgate.v1 import adapters_pb2 as pb
from adaptgate.v1 import datasets_pb2
from tests.unit.peft_adapters import make_peft_adapter
from tests.unit.test_adapter_store import Aborted, Context

MiB = 1 << 20


def test_a_second_upload_from_one_tenant_is_refused_while_another_tenant_is_accepted() -> None:
    admission = UploadAdmission(UploadLimits(max_uploads_per_tenant=1, max_uploads=3))
    with admission.admit("acme"):
        with pytest.raises(UploadsBusy, match=r"'acme' already has 1 uploads in progress \(max_uploads_per_tenant\)"):
            with admission.admit("acme"):
                pass
        with admission.admit("globex"), admission.admit("initech"):
            with pytest.raises(UploadsBusy, match=r"server already has 3 uploads in progress \(max_uploads\)"):
                with admission.admit("umbrella"):
                    pass
    with admission.admit("acme"):  # the slot comes back when the upload ends
        pass
    assert admission.in_flight() == (0, 0)


def test_bytes_in_flight_are_bounded_per_tenant_and_for_the_server() -> None:
    admission = UploadAdmission(UploadLimits(max_upload_bytes_in_flight_per_tenant=100, max_upload_bytes_in_flight=150))
    with admission.admit("acme") as first, admission.admit("acme") as second:
        first.receive(60)
        with pytest.raises(UploadsBusy, match=r"\(max_upload_bytes_in_flight_per_tenant\)"):
            second.receive(41)
        second.receive(40)
        with admission.admit("globex") as other:
            with pytest.raises(UploadsBusy, match=r"\(max_upload_bytes_in_flight\)"):
                other.receive(51)
            other.receive(50)
            assert admission.in_flight("acme") == (2, 100) and admission.in_flight() == (3, 150)
    assert admission.in_flight() == (0, 0)


@pytest.fixture(scope="module")
def base(tiny_bert_dir: Path):
    return load_base_model(tiny_bert_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def adapter_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("upload-adapter")
    make_peft_adapter(tiny_bert_dir, out, num_labels=2, rank=4, seed=13)
    return out


class Rig:
    """The Adapters and Datasets servicers over real stores, a real spool and real admission."""

    def __init__(self, tmp_path: Path, base, limits: UploadLimits, max_adapter_bytes: int, max_dataset_bytes: int = 1 * MiB):
        auth = TokenAuthenticator({"acme": Principal("acme"), "globex": Principal("globex")})
        runtime = RpcRuntime(auth, Metrics(), TenantAdmission(0))
        self.store = AdapterStore(tmp_path / "adapters", AdapterValidator(base.spec, 8, 8))
        self.engine = Engine(base, EngineConfig(n_slots=2, max_rank=8, max_labels=8))
        cache = AdapterCache(self.store, self.engine, 2, Metrics())
        self.spool = tmp_path / "uploads"
        self.uploads = Uploads(self.spool, UploadAdmission(limits))
        adapter_limit = SizeLimit(max_adapter_bytes, "max_adapter_upload_bytes", "adapter")
        self.adapters = AdaptersServicer(runtime, self.store, cache, self.uploads, adapter_limit)
        self.datasets_store = DatasetStore(tmp_path / "datasets", Database(tmp_path / "db.sqlite"))
        dataset_limit = SizeLimit(max_dataset_bytes, "max_upload_bytes", "dataset")
        self.datasets = DatasetsServicer(runtime, self.datasets_store, self.uploads, dataset_limit)

    def leftovers(self) -> list[Path]:
        return list(self.spool.rglob("*"))


def adapter_chunks(directory: Path, name: str, chunk: int = 64 << 10) -> list[pb.UploadAdapterChunk]:
    out = [pb.UploadAdapterChunk(name=name)]
    for path in sorted(p for p in directory.iterdir() if p.suffix in (".json", ".safetensors")):
        data = path.read_bytes()
        out += [pb.UploadAdapterChunk(filename=path.name, data=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return out


async def stream(items: list, pulled: list[int] | None = None) -> AsyncIterator:
    for item in items:
        if pulled is not None:
            pulled.append(1)
        yield item


def test_an_upload_over_its_limit_is_refused_at_the_chunk_that_crosses_it_and_leaves_nothing(tmp_path: Path, base) -> None:
    rig = Rig(tmp_path, base, UploadLimits(), max_adapter_bytes=4 * MiB)
    block = b"\0" * MiB
    chunks = [pb.UploadAdapterChunk(name="big")] + [
        pb.UploadAdapterChunk(filename="adapter_model.safetensors", data=block) for _ in range(10)
    ]
    pulled: list[int] = []
    with pytest.raises(Aborted) as refused:
        asyncio.run(rig.adapters.UploadAdapter(stream(chunks, pulled), Context("acme")))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4 MiB limit (max_adapter_upload_bytes = 4194304 bytes)" in refused.value.details
    assert len(pulled) == 1 + 5, "refused at the fifth MiB, without reading the rest of the stream"
    assert rig.leftovers() == [] and rig.uploads.admission.in_flight() == (0, 0)


def test_an_adapter_upload_streams_to_disk_and_memory_stays_flat(tmp_path: Path, base) -> None:
    rig = Rig(tmp_path, base, UploadLimits(), max_adapter_bytes=64 * MiB)
    block = b"\1" * MiB

    async def chunks() -> AsyncIterator[pb.UploadAdapterChunk]:
        yield pb.UploadAdapterChunk(name="big")
        yield pb.UploadAdapterChunk(filename="adapter_config.json", data=b'{"peft_type": "LORA", "r": 4}')
        for _ in range(48):
            yield pb.UploadAdapterChunk(filename="adapter_model.safetensors", data=block)

    tracemalloc.start()
    try:
        with pytest.raises(Aborted) as refused:
            asyncio.run(rig.adapters.UploadAdapter(chunks(), Context("acme")))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details  # 48 MiB of ones is no safetensors file
    assert peak < 16 * MiB, f"a 48 MiB upload peaked at {peak / MiB:.0f} MiB of Python memory"
    assert rig.leftovers() == []


def test_a_cancelled_upload_leaves_nothing_and_frees_its_slot(tmp_path: Path, base) -> None:
    rig = Rig(tmp_path, base, UploadLimits(max_uploads_per_tenant=1), max_adapter_bytes=4 * MiB)

    async def body() -> None:
        waiting = asyncio.Event()

        async def chunks() -> AsyncIterator[pb.UploadAdapterChunk]:
            yield pb.UploadAdapterChunk(name="slow")
            yield pb.UploadAdapterChunk(filename="adapter_model.safetensors", data=b"\0" * 1000)
            waiting.set()
            await asyncio.Event().wait()  # the client goes silent

        task = asyncio.create_task(rig.adapters.UploadAdapter(chunks(), Context("acme")))
        await asyncio.wait_for(waiting.wait(), 10)
        assert [p.name for p in rig.leftovers() if p.is_file()] == ["adapter_model.safetensors"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert rig.leftovers() == [] and rig.uploads.admission.in_flight() == (0, 0)

    asyncio.run(body())


def test_a_busy_tenant_is_refused_at_once_while_another_tenant_uploads(tmp_path: Path, base, adapter_dir: Path) -> None:
    rig = Rig(tmp_path, base, UploadLimits(max_uploads_per_tenant=1), max_adapter_bytes=4 * MiB)

    async def body() -> None:
        waiting, release = asyncio.Event(), asyncio.Event()

        async def held() -> AsyncIterator[pb.UploadAdapterChunk]:
            for chunk in adapter_chunks(adapter_dir, "first"):
                yield chunk
            waiting.set()
            await release.wait()

        first = asyncio.create_task(rig.adapters.UploadAdapter(held(), Context("acme")))
        await asyncio.wait_for(waiting.wait(), 10)
        with pytest.raises(Aborted) as busy:
            await rig.adapters.UploadAdapter(stream(adapter_chunks(adapter_dir, "second")), Context("acme"))
        assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_uploads_per_tenant" in busy.value.details
        other = await rig.adapters.UploadAdapter(stream(adapter_chunks(adapter_dir, "theirs")), Context("globex"))
        assert other.ref == "globex/theirs@v1"
        release.set()
        assert (await asyncio.wait_for(first, 30)).ref == "acme/first@v1"

    asyncio.run(body())
    assert rig.leftovers() == []


def test_a_dataset_upload_is_parsed_from_disk_and_stored_normalized(tmp_path: Path, base) -> None:
    rig = Rig(tmp_path, base, UploadLimits(), max_adapter_bytes=MiB, max_dataset_bytes=MiB)
    rows = [{"body": f"{word} number {i}", "kind": word} for i in range(20) for word in ("cat", "tax")]
    data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
    first = datasets_pb2.UploadDatasetChunk(name="pets", format="jsonl", text_field="body", label_field="kind", data=data[:100])
    rest = [datasets_pb2.UploadDatasetChunk(data=data[i : i + 100]) for i in range(100, len(data), 100)]
    record = asyncio.run(rig.datasets.UploadDataset(stream([first, *rest]), Context("acme")))
    assert (record.rows, record.size_bytes) == (40, len(data))
    stored = rig.datasets_store.load(rig.datasets_store.get("acme", record.id))
    assert stored[0][:2] == ["cat number 0", "tax number 0"] and stored[1][:2] == ["cat", "tax"]
    assert rig.leftovers() == []
    too_big = [first, datasets_pb2.UploadDatasetChunk(data=b"x" * MiB)]
    with pytest.raises(Aborted) as refused:
        asyncio.run(rig.datasets.UploadDataset(stream(too_big), Context("acme")))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "(max_upload_bytes = 1048576 bytes)" in refused.value.details
    assert rig.leftovers() == []


@pytest.mark.parametrize("rpc", ["adapters", "datasets"])
def test_an_upload_without_its_header_is_invalid_argument_and_leaves_nothing(tmp_path: Path, base, rpc: str) -> None:
    """Both upload RPCs read their stream the same way (Uploads.receive_chunks): an empty stream, or one whose
    first message names nothing, is INVALID_ARGUMENT with the RPC's own sentence and leaves nothing behind."""
    rig = Rig(tmp_path, base, UploadLimits(), max_adapter_bytes=MiB)
    if rpc == "adapters":
        upload, nameless = rig.adapters.UploadAdapter, pb.UploadAdapterChunk(filename="adapter_config.json", data=b"{}")
        sentence = "the first UploadAdapter chunk must carry the adapter name"
    else:
        upload, nameless = rig.datasets.UploadDataset, datasets_pb2.UploadDatasetChunk(name="  ", data=b"{}")
        sentence = "the first UploadDataset chunk must carry the dataset name and format"
    for chunks in ([], [nameless]):
        with pytest.raises(Aborted) as refused:
            asyncio.run(upload(stream(chunks), Context("acme")))
        assert (refused.value.code, refused.value.details) == (grpc.StatusCode.INVALID_ARGUMENT, sentence)
        assert rig.leftovers() == []
    assert rig.uploads.admission.in_flight() == (0, 0)
