"""Reference resolution from memory: after the first call no directory listing and no JSON read, yet a
write by any replica sharing the store (a second AdapterStore on the same root) is seen by the next
call, a deleted version is never resolved once its delete returned, and concurrent publishes and alias
moves agree with what a fresh store reads from the disk."""

from __future__ import annotations

import io
import json
import os
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptgate.adapters import resolution
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.durable import write_atomically
from adaptgate.engine.model import load_base_model
from adaptgate.errors import AdapterNotFound, FailedPrecondition
from tests.unit.peft_adapters import adapter_files, make_peft_adapter

PROD = AdapterRef("acme", "spam", alias="prod")
LATEST = AdapterRef("acme", "spam")


@pytest.fixture(scope="module")
def validator(tiny_bert_dir: Path) -> AdapterValidator:
    return AdapterValidator(load_base_model(tiny_bert_dir, dtype="float32", device="cpu").spec, 8, 8)


@pytest.fixture(scope="module")
def files(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("resolution-adapter")
    make_peft_adapter(tiny_bert_dir, out, num_labels=2, rank=4, seed=3)
    return adapter_files(out)


def replicas(root: Path, validator: AdapterValidator, n: int = 2) -> list[AdapterStore]:
    """Gateway replicas mounting one volume: each its own AdapterStore (own memory, own lock) on one root."""
    return [AdapterStore(root, validator) for _ in range(n)]


class DiskReads:
    """Counts what the process asks of the disk by wrapping (and calling through to) the real calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        real_scandir, real_io_open, real_os_open = os.scandir, io.open, os.open

        def scandir(path=".", *args, **kwargs):
            self.calls["scandir"] += 1
            return real_scandir(path, *args, **kwargs)

        def io_open(file, *args, **kwargs):
            self.calls[f"open {Path(file).name}"] += 1
            return real_io_open(file, *args, **kwargs)

        def os_open(path, *args, **kwargs):
            self.calls[f"open {Path(path).name}"] += 1
            return real_os_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "scandir", scandir)
        monkeypatch.setattr(io, "open", io_open)
        monkeypatch.setattr(os, "open", os_open)


def test_resolution_is_served_from_memory_after_the_first_call(
    tmp_path: Path, validator: AdapterValidator, files, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path, validator)
    store.publish("acme", "spam", files, alias="prod")
    store.publish("acme", "spam", files)
    forms = [PROD, LATEST, AdapterRef("acme", "spam", 1)]
    first = [store.resolve(ref) for ref in forms] + [store.get(PROD)]
    loads, reads = store.resolve_stats.loads, DiskReads(monkeypatch)
    for _ in range(50):
        assert [store.resolve(ref) for ref in forms] + [store.get(PROD)] == first
    assert reads.calls["scandir"] == 0, "no directory listing once the adapter is in memory"
    assert set(reads.calls) == {"open generation"}, f"only the generation check reads the disk: {reads.calls}"
    assert reads.calls["open generation"] == 50 * 4, "one generation check per call"
    assert store.resolve_stats.loads == loads and store.resolve_stats.hits >= 200


def test_a_write_by_another_replica_is_seen_on_the_next_resolve(
    tmp_path: Path, validator: AdapterValidator, files
) -> None:
    mine, other = replicas(tmp_path, validator)
    other.publish("acme", "spam", files, alias="prod")
    assert mine.resolve(PROD).version == 1
    assert mine.resolve(PROD).version == 1 and mine.resolve_stats.hits == 1
    other.publish("acme", "spam", files)
    assert mine.resolve(LATEST).version == 2, "a version another replica published"
    other.set_alias(AdapterRef("acme", "spam", 2), "prod")
    assert mine.resolve(PROD).version == 2, "an alias another replica moved"
    assert mine.get(AdapterRef("acme", "spam", 2)).aliases == ["prod"]
    other.delete(AdapterRef("acme", "spam", 1))
    with pytest.raises(AdapterNotFound):
        mine.resolve(AdapterRef("acme", "spam", 1))
    other.delete(LATEST, force=True)
    with pytest.raises(AdapterNotFound):
        mine.resolve(LATEST)
    other.publish("acme", "spam", files)
    republished = mine.get(LATEST)
    assert republished.version == 1 and republished.aliases == [], "a name deleted and published again starts over"
    assert republished.created_at == other.get(LATEST).created_at, "the new v1's record, not the deleted one's"


def test_the_generation_is_seen_when_the_directory_looks_unchanged(
    tmp_path: Path, validator: AdapterValidator, files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NFS client may answer `stat` of a directory from its attribute cache, and two writes within one
    clock tick leave the same mtime: the generation file, opened (and so revalidated) each call, still tells."""
    mine, other = replicas(tmp_path, validator)
    other.publish("acme", "spam", files, alias="prod")
    other.publish("acme", "spam", files)
    assert mine.resolve(PROD).version == 1
    real_stat, first_seen = os.stat, {}

    def cached_stat(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        return first_seen.setdefault(os.fspath(path), result) if Path(path).name == "spam" else result

    monkeypatch.setattr(resolution.os, "stat", cached_stat)
    assert mine.resolve(PROD).version == 1
    other.set_alias(AdapterRef("acme", "spam", 2), "prod")
    assert mine.resolve(PROD).version == 2


def test_writes_without_a_generation_file_are_seen(tmp_path: Path, validator: AdapterValidator, files) -> None:
    """A store written before generation files existed, and a replica of that older version still writing
    during a rolling upgrade: the directory's `stat` tells."""
    mine, other = replicas(tmp_path, validator)
    other.publish("acme", "spam", files, alias="prod")
    other.publish("acme", "spam", files)
    adapter_dir = tmp_path / "acme" / "spam"
    (adapter_dir / resolution.GENERATION_FILE).unlink()
    long_ago = os.stat(adapter_dir).st_mtime_ns - 3600 * 10**9
    os.utime(adapter_dir, ns=(long_ago, long_ago))
    assert mine.resolve(PROD).version == 1
    loads = mine.resolve_stats.loads
    assert mine.resolve(PROD).version == 1 and mine.resolve_stats.loads == loads, "a settled adapter is cached"
    write_atomically(adapter_dir / "aliases.json", json.dumps({"prod": 2}).encode())  # as the older version does
    assert mine.resolve(PROD).version == 2


def test_a_deleted_version_is_never_resolved_once_its_delete_returned(
    tmp_path: Path, validator: AdapterValidator, files
) -> None:
    mine, other = replicas(tmp_path, validator)
    for _ in range(3):
        other.publish("acme", "spam", files)
    deleted = threading.Event()
    seen_after: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        after = 0
        try:
            while after < 200:
                started_after = deleted.is_set()  # read before the call starts
                version = mine.resolve(LATEST).version
                try:
                    concrete = mine.resolve(AdapterRef("acme", "spam", 3)).version
                except AdapterNotFound:
                    concrete = None
                if started_after:
                    seen_after.extend([version] + ([concrete] if concrete is not None else []))
                    after += 1
        except BaseException as exc:  # noqa: BLE001 - asserted on by the test thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    other.delete(AdapterRef("acme", "spam", 3))
    deleted.set()
    thread.join()
    assert errors == []
    assert seen_after and set(seen_after) == {2}, "v3 was resolved after its delete returned"


OPS = st.lists(
    st.tuples(
        st.integers(0, 1),  # which replica writes
        st.sampled_from(["publish", "publish prod", "alias prod", "alias canary", "delete version", "delete name"]),
        st.integers(1, 4),  # the version an alias move or a delete names
    ),
    min_size=1, max_size=10,
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_replicas_resolve_what_the_disk_holds_after_every_write(
    tmp_path_factory: pytest.TempPathFactory, validator: AdapterValidator, files, ops
) -> None:
    """After each acknowledged write by either replica, both replicas (which resolved before it, so hold
    views in memory) answer every reference form as a store with nothing in memory answers it."""
    root = tmp_path_factory.mktemp("replicas")
    stores = replicas(root, validator)
    refs = [LATEST, PROD, AdapterRef("acme", "spam", alias="canary"), *(AdapterRef("acme", "spam", v) for v in range(1, 5))]

    def answers(store: AdapterStore) -> list[object]:
        out: list[object] = []
        for ref in refs:
            try:
                out.append(store.resolve(ref))
            except AdapterNotFound:
                out.append(None)
        return out

    for writer, op, version in ops:
        for store in stores:
            answers(store)  # both hold a view of the state before the write
        store = stores[writer]
        try:
            if op.startswith("publish"):
                store.publish("acme", "spam", files, alias="prod" if op.endswith("prod") else "")
            elif op.startswith("alias"):
                store.set_alias(AdapterRef("acme", "spam", version), op.split()[1])
            else:
                store.delete(AdapterRef("acme", "spam", version if op == "delete version" else None), force=True)
        except (AdapterNotFound, FailedPrecondition):
            pass
        truth = answers(AdapterStore(root, validator))
        assert answers(stores[0]) == truth and answers(stores[1]) == truth, (op, version)


def test_concurrent_publishes_and_alias_moves_never_go_back(
    tmp_path: Path, validator: AdapterValidator, files
) -> None:
    """A reader on one replica while another publishes and moves `prod` to each new version: every call
    that starts after a publish returned sees that version or a later one, and never an older one later."""
    mine, other = replicas(tmp_path, validator)
    other.publish("acme", "spam", files, alias="prod")
    acknowledged, stop = [1], threading.Event()
    violations: list[str] = []

    def reader() -> None:
        last = {PROD: 0, LATEST: 0}
        while not stop.is_set():
            for ref in (PROD, LATEST):
                floor = acknowledged[-1]
                version = mine.resolve(ref).version
                if version < floor or version < last[ref]:
                    violations.append(f"{ref} -> v{version} after v{floor} was acknowledged (last seen v{last[ref]})")
                last[ref] = version

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(8):
            acknowledged.append(other.publish("acme", "spam", files, alias="prod").version)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert violations == []
    assert mine.resolve(PROD).version == mine.resolve(LATEST).version == 9


MOUNTS = """\
overlay / overlay rw,relatime 0 0
/dev/nvme0n1p1 /data ext4 rw,relatime 0 0
server:/export /data/adapters nfs4 rw,relatime,vers=4.2 0 0
tmpfs /tmp tmpfs rw 0 0
s3fs /mnt/my\\040bucket fuse.s3fs rw 0 0
"""


@pytest.mark.parametrize(
    ("path", "local"),
    [("/data/store", True), ("/data/adapters/acme", False), ("/data/adapters", False), ("/srv", True),
     ("/tmp/x", True), ("/mnt/my bucket/store", False)],
)
def test_a_store_on_a_network_filesystem_is_known_as_such(path: str, local: bool) -> None:
    """The innermost mount decides: an NFS export mounted inside a local disk is NFS (and a FUSE mount too)."""
    assert resolution.on_local_filesystem(Path(path), MOUNTS) is local


async def test_on_a_local_disk_a_reference_resolves_on_the_event_loop(tmp_path: Path, validator, files) -> None:
    """No worker-thread hop per request where the check costs microseconds; a network store keeps the hop."""
    from adaptgate.adapters.cache import AdapterCache
    from adaptgate.metrics import Metrics

    store = AdapterStore(tmp_path / "store", validator)
    store.publish("acme", "spam", files, alias="prod")
    threads: list[int] = []
    resolve = store.resolve_published

    def recording(ref: AdapterRef) -> tuple[AdapterRef, float]:
        threads.append(threading.get_ident())
        return resolve(ref)

    store.resolve_published = recording  # type: ignore[method-assign]
    cache = AdapterCache(store, None, 2, Metrics())  # type: ignore[arg-type]
    ref = AdapterRef("acme", "spam", alias="prod")
    assert store.local, "the test's temporary directory should be a local filesystem"
    assert await cache._resolve_published(ref) == resolve(ref)
    store.local = False  # as on an NFS mount
    assert await cache._resolve_published(ref) == resolve(ref)
    assert threads[0] == threading.get_ident() and threads[1] != threading.get_ident()
