"""The adapter store on disk: strays never break a listing, writes are durable, deletes are safe
(RELIABILITY 38): a version or a whole name, refused while aliased unless forced, refused while a
request holds it, and a deleted version's number is never handed out again."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest

from adaptgate.adapters.cache import AdapterCache
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.api.adapters import AdaptersServicer
from adaptgate.api.admission import TenantAdmission
from adaptgate.api.auth import Principal, TokenAuthenticator
from adaptgate.api.rpc import RpcRuntime
from adaptgate.api.uploads import SizeLimit, UploadAdmission, UploadLimits, Uploads
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.model import load_base_model
from adaptgate.errors import AdapterNotFound, FailedPrecondition, InvalidArgument
from adaptgate.metrics import Metrics
from adaptgate.v1 import adapters_pb2 as pb
from tests.unit.peft_adapters import adapter_files, make_peft_adapter


@pytest.fixture(scope="module")
def base(tiny_bert_dir: Path):
    return load_base_model(tiny_bert_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def files(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("store-adapter")
    make_peft_adapter(tiny_bert_dir, out, num_labels=2, rank=4, seed=11)
    return adapter_files(out)


@pytest.fixture()
def store(tmp_path: Path, base) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters", AdapterValidator(base.spec, 8, 8))


def refs(store: AdapterStore, tenant: str | None = "acme") -> list[str]:
    return [str(r.ref) for r in store.list(tenant)]


def test_stray_entries_in_the_store_do_not_break_listing(store: AdapterStore, files) -> None:
    store.publish("acme", "spam", files)
    root = store.root
    (root / "lost+found").mkdir()
    (root / "Bad Name").mkdir()
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "README").write_text("not a tenant")
    (root / "acme" / ".DS_Store").write_bytes(b"\0")
    (root / "acme" / "UPPER").mkdir()
    (root / "acme" / "notes.txt").write_text("not an adapter")
    (root / "acme" / "spam" / "v7").write_text("a file, not a version")
    assert refs(store, None) == ["acme/spam@v1"]
    assert refs(store) == ["acme/spam@v1"]


def test_versions_records_and_aliases_are_fsynced_with_their_directories(
    store: AdapterStore, files, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[Path] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.publish("acme", "spam", files)
    adapter_dir = store.root / "acme" / "spam"
    names = {p.name for p in synced}
    assert {"record.json", *files} <= names, "every file of the version is on disk before it is renamed into place"
    assert synced[-1] == adapter_dir, "the rename that publishes the version is made durable"
    synced.clear()
    store.set_alias(AdapterRef("acme", "spam", 1), "prod")
    # the alias file, then the generation file that tells other replicas: each written beside, then renamed over
    assert [p.parent for p in synced[0::2]] == [adapter_dir] * 2 and synced[1::2] == [adapter_dir] * 2
    assert synced[0].name != "aliases.json", "the alias file is written beside, then replaced atomically"
    assert synced[2].name.startswith(".generation."), "the generation moves after the alias, atomically"


def test_delete_a_version_keeps_the_others_and_never_reuses_its_number(store: AdapterStore, files) -> None:
    for _ in range(3):
        store.publish("acme", "spam", files)
    deletion = store.delete(AdapterRef("acme", "spam", 3))
    assert deletion.refs == [AdapterRef("acme", "spam", 3)] and deletion.aliases == []
    assert refs(store) == ["acme/spam@v1", "acme/spam@v2"]
    assert store.resolve(AdapterRef("acme", "spam")).version == 2
    with pytest.raises(AdapterNotFound):
        store.get(AdapterRef("acme", "spam", 3))
    assert store.publish("acme", "spam", files).version == 4
    assert not any(p.name.startswith(".deleting") for p in (store.root / "acme" / "spam").iterdir())


def test_delete_a_name_removes_every_version(store: AdapterStore, files) -> None:
    store.publish("acme", "spam", files)
    store.publish("acme", "spam", files)
    store.publish("acme", "eggs", files)
    deletion = store.delete(AdapterRef("acme", "spam"))
    assert deletion.refs == [AdapterRef("acme", "spam", 1), AdapterRef("acme", "spam", 2)]
    assert refs(store) == ["acme/eggs@v1"]
    with pytest.raises(AdapterNotFound):
        store.resolve(AdapterRef("acme", "spam"))
    assert not (store.root / "acme" / "spam").exists()


def test_an_aliased_version_is_refused_unless_forced(store: AdapterStore, files) -> None:
    store.publish("acme", "spam", files, alias="prod")
    store.publish("acme", "spam", files, alias="canary")
    for ref in (AdapterRef("acme", "spam", 1), AdapterRef("acme", "spam")):
        with pytest.raises(FailedPrecondition, match="'prod' points at v1"):
            store.delete(ref)
    assert refs(store) == ["acme/spam@v1", "acme/spam@v2"]
    deletion = store.delete(AdapterRef("acme", "spam", 1), force=True)
    assert deletion.aliases == ["prod"]
    with pytest.raises(AdapterNotFound):
        store.resolve(AdapterRef("acme", "spam", alias="prod"))
    assert store.get(AdapterRef("acme", "spam", alias="canary")).version == 2


def test_delete_refuses_an_alias_reference_and_unknown_versions(store: AdapterStore, files) -> None:
    store.publish("acme", "spam", files, alias="prod")
    with pytest.raises(InvalidArgument, match="names an alias"):
        store.delete(AdapterRef("acme", "spam", alias="prod"), force=True)
    with pytest.raises(AdapterNotFound):
        store.delete(AdapterRef("acme", "spam", 7))
    with pytest.raises(AdapterNotFound):
        store.delete(AdapterRef("acme", "nothing"))
    assert refs(store) == ["acme/spam@v1"]


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Context:
    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def invocation_metadata(self):
        return self.metadata

    def set_trailing_metadata(self, metadata) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def test_delete_rpc_waits_for_requests_holding_the_version_and_hides_other_tenants(
    store: AdapterStore, files, base, tmp_path: Path
) -> None:
    async def body() -> None:
        engine = Engine(base, EngineConfig(n_slots=2, max_rank=8, max_labels=8))
        engine.start()
        cache = AdapterCache(store, engine, 2, Metrics())
        auth = TokenAuthenticator({"acme": Principal("acme"), "globex": Principal("globex")})
        runtime = RpcRuntime(auth, Metrics(), TenantAdmission(0))
        uploads = Uploads(tmp_path / "uploads", UploadAdmission(UploadLimits()))
        limit = SizeLimit(1 << 20, "max_adapter_upload_bytes", "adapter")
        servicer = AdaptersServicer(runtime, store, cache, uploads, limit)
        store.publish("acme", "spam", files)
        store.publish("acme", "spam", files)
        request = pb.AdapterRef(ref="spam@1")
        with pytest.raises(Aborted) as other:
            await servicer.DeleteAdapter(request, Context("globex"))
        assert other.value.code == grpc.StatusCode.NOT_FOUND
        async with cache.lease(AdapterRef("acme", "spam", 1)):
            with pytest.raises(Aborted) as held:
                await servicer.DeleteAdapter(request, Context("acme"))
            assert held.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refs(store) == ["acme/spam@v1", "acme/spam@v2"]
        await cache.load(AdapterRef("acme", "spam", 2))
        response = await servicer.DeleteAdapter(pb.AdapterRef(ref="spam"), Context("acme"))
        assert list(response.deleted) == ["acme/spam@v1", "acme/spam@v2"]
        assert cache.resident(AdapterRef("acme", "spam", 2)) is None, "a deleted version leaves its slot"
        assert refs(store) == []
        await engine.stop()

    asyncio.run(body())


def test_two_replicas_sharing_the_store_publish_distinct_versions(tmp_path: Path, base, files) -> None:
    """Control replicas share one adapter volume: a version number another replica took first is skipped, never
    overwritten or failed on."""
    import threading

    replicas = [AdapterStore(tmp_path / "adapters", AdapterValidator(base.spec, 8, 8)) for _ in range(2)]
    start, published, errors = threading.Barrier(2), [], []

    def publish(store: AdapterStore, index: int) -> None:
        start.wait()
        for i in range(12):
            try:
                published.append(str(store.publish("acme", "spam", files, source=f"job:r{index}-{i}").ref))
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

    threads = [threading.Thread(target=publish, args=(store, i)) for i, store in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(published) == sorted(f"acme/spam@v{v}" for v in range(1, 25))
    sources = {r.source for r in replicas[0].list("acme")}
    assert sources == {f"job:r{r}-{i}" for r in range(2) for i in range(12)}
