"""The slot cache: one load for concurrent callers, LRU eviction of idle adapters only, pins only an admin
lifts, a request's lease taken the moment its adapter lands, deletes that wait for the requests using a
version, failed loads that leave no trace, and flat memory across many load/unload cycles
(RELIABILITY 17, 18, 20, 21)."""

from __future__ import annotations

import asyncio
import gc
import shutil
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from adaptgate.adapters.cache import AdapterCache
from adaptgate.adapters.format import WEIGHTS_FILE
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.adapters.weights_cache import WeightsCache
from adaptgate.api.adapters import AdaptersServicer
from adaptgate.api.auth import Principal
from adaptgate.engine.engine import Engine, EngineConfig, HeadWeights
from adaptgate.engine.model import load_base_model
from adaptgate.errors import AdapterNotFound, FailedPrecondition, PermissionDenied, ResourceExhausted
from adaptgate.metrics import Metrics
from adaptgate.v1 import adapters_pb2 as pb
from tests.conftest import make_tiny_bert
from tests.unit.peft_adapters import adapter_files, make_peft_adapter

T = TypeVar("T")
HEAD_KEY = "base_model.model.classifier.weight"
WAIT_S = 10.0


@pytest.fixture(scope="module")
def files(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("cache-adapter")
    make_peft_adapter(tiny_bert_dir, out, num_labels=2, rank=4, seed=5)
    return adapter_files(out)


class CountingStore(AdapterStore):
    reads = 0

    def read_files(self, ref: AdapterRef) -> dict[str, bytes]:
        self.reads += 1
        return super().read_files(ref)


async def make_cache(tiny_bert_dir: Path, root: Path, files: dict[str, bytes], n_slots: int, n_adapters: int):
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    store = CountingStore(root, AdapterValidator(base.spec, 8, 8))
    for i in range(n_adapters):
        store.publish("acme", f"a{i}", files)
    engine = Engine(base, EngineConfig(n_slots=n_slots, max_rank=8, max_labels=8))
    engine.start()
    return AdapterCache(store, engine, n_slots, Metrics(), host_budget_bytes=1 << 30), engine


def ref(i: int) -> AdapterRef:
    return AdapterRef("acme", f"a{i}")


def v1(name: str) -> AdapterRef:
    return AdapterRef("acme", name, 1)


def variant(files: dict[str, bytes], scale: float) -> dict[str, bytes]:
    """The same adapter with its head scaled: a distinguishable adapter without another PEFT build."""
    tensors = load_tensors(files[WEIGHTS_FILE])
    tensors[HEAD_KEY] = tensors[HEAD_KEY] * scale
    return {**files, WEIGHTS_FILE: save_tensors(tensors)}


class SlotRecorder:
    """An engine double that records whose head each slot holds; the next held call waits for `gate`.

    Only the cache's ordering is under test here, so the slots are a dict and a held call lets the
    test line coroutines up at exact points.
    """

    def __init__(self) -> None:
        self.heads: dict[int, torch.Tensor] = {}
        self.gate = asyncio.Event()
        self._held: dict[str, asyncio.Event] = {}

    def hold_next(self, call: str) -> asyncio.Event:
        """The next `install` or `clear` waits for the gate; the returned event is set when it starts waiting."""
        self._held[call] = asyncio.Event()
        return self._held[call]

    async def _maybe_hold(self, call: str) -> None:
        if (entered := self._held.pop(call, None)) is not None:
            entered.set()
            await self.gate.wait()

    async def install(self, slot: int, lora: dict, scaling: float, head: HeadWeights | None) -> None:
        await self._maybe_hold("install")
        assert head is not None
        self.heads[slot] = head.weight

    async def clear(self, slot: int) -> None:
        await self._maybe_hold("clear")
        self.heads.pop(slot, None)


class WatchedWeights(WeightsCache):
    """The host tier, telling the test when a load asks it for weights: the load's last step before it claims a slot."""

    def __init__(self, budget_bytes: int) -> None:
        super().__init__(budget_bytes)
        self._watched: dict[AdapterRef, asyncio.Event] = {}

    def watch(self, ref: AdapterRef) -> asyncio.Event:
        """Set when a load next asks for `ref`'s weights."""
        self._watched[ref] = asyncio.Event()
        return self._watched[ref]

    def get(self, ref: AdapterRef, published: float | None = None):
        if (asked := self._watched.pop(ref, None)) is not None:
            asked.set()
        return super().get(ref, published)


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, WAIT_S)


async def threads_done() -> None:
    """With a one-thread default executor: every thread call made before this one has run, and the
    coroutine that awaited it has taken its next step."""
    await asyncio.to_thread(lambda: None)


async def recorded_cache(root: Path, tiny_bert_dir: Path, files: dict[str, bytes], n_slots: int, names: list[str]):
    """A cache over a SlotRecorder, with thread calls in order (one worker) so each interleaving is exact."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    validator = AdapterValidator(base.spec, 8, 8)
    store = CountingStore(root, validator)
    heads = {}
    for k, name in enumerate(names):
        adapter = variant(files, k + 1.0)
        store.publish("acme", name, adapter)
        heads[name] = validator.parse(adapter).head_weight
    engine = SlotRecorder()
    cache = AdapterCache(store, engine, n_slots, Metrics())  # type: ignore[arg-type]
    cache.weights = WatchedWeights(1 << 30)
    return cache, engine, heads


def test_concurrent_loads_of_one_adapter_load_it_once(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=4, n_adapters=1)
        residents = await asyncio.gather(*(cache.load(ref(0)) for _ in range(20)))
        assert len({id(r) for r in residents}) == 1
        assert cache.store.reads == 1
        await engine.stop()

    asyncio.run(body())


def test_lru_evicts_idle_adapters_and_keeps_leased_and_pinned(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=2, n_adapters=4)
        await cache.load(ref(0), pinned_by="ops")
        await cache.load(ref(1))
        await cache.load(ref(2))  # a1 is the least recently used idle one
        assert cache.resident(AdapterRef("acme", "a1", 1)) is None
        assert cache.resident(AdapterRef("acme", "a0", 1)) is not None
        async with cache.lease(ref(2)):
            with pytest.raises(ResourceExhausted, match="pinned or serving"):
                await cache.load(ref(3))
        await cache.load(ref(3))  # a2 is idle again
        assert cache.resident(AdapterRef("acme", "a2", 1)) is None
        assert cache.store.reads == 4
        await cache.load(ref(1))  # re-load comes from the host tier, not the disk
        assert cache.store.reads == 4
        await engine.stop()

    asyncio.run(body())


def test_a_request_waiting_on_a_load_leases_that_adapter_and_no_other(
    tiny_bert_dir: Path, tmp_path: Path, files
) -> None:
    """LoadAdapter loads `a` (no lease); a request waits on that load; when it lands, a load of `z`
    claims a slot before the waiting request runs again. The request must still be served by `a`'s
    weights, never by whatever took `a`'s slot."""

    async def body() -> tuple[torch.Tensor | None, bool, torch.Tensor]:
        cache, engine, heads = await recorded_cache(tmp_path, tiny_bert_dir, files, 2, ["x", "a", "y", "z"])
        await cache.load(v1("x"))
        await cache.load(v1("z"))
        await cache.unload(v1("z"))  # z's weights stay in the host tier: its next load goes straight to a slot
        installing_a = engine.hold_next("install")
        admin_load = asyncio.create_task(cache.load(v1("a")))
        await within(installing_a.wait())
        clearing_x = engine.hold_next("clear")
        load_y = asyncio.create_task(cache.load(v1("y")))  # evicts x, holding the slot lock until x is cleared
        await within(clearing_x.wait())

        started = asyncio.Event()

        async def request() -> tuple[torch.Tensor | None, bool]:
            started.set()
            async with cache.lease(v1("a")) as resident:
                return engine.heads.get(resident.slot), cache.resident(v1("a")) is resident

        waiting = asyncio.create_task(request())
        await within(started.wait())
        await within(threads_done())  # the request now waits on the load of a
        asked_for_z = cache.weights.watch(v1("z"))
        load_z = asyncio.create_task(cache.load(v1("z")))
        await within(asked_for_z.wait())  # the load of z now waits for the slot lock
        engine.gate.set()
        seen, live = await within(waiting)
        await within(asyncio.gather(admin_load, load_y, load_z, return_exceptions=True))
        return seen, live, heads["a"]

    seen, live, expected = asyncio.run(body())
    assert seen is not None and torch.equal(seen, expected), "the request's slot held another adapter's weights"
    assert live, "the request leased an adapter that was no longer resident"


def test_a_tenant_cannot_unpin_what_an_admin_pinned(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=2, n_adapters=1)
        servicer = AdaptersServicer(None, cache.store, cache, None, None)  # type: ignore[arg-type]  # no uploads here
        admin, tenant = Principal("ops", admin=True), Principal("acme")
        load, unload = AdaptersServicer.LoadAdapter.__wrapped__, AdaptersServicer.UnloadAdapter.__wrapped__
        pinned = await load(servicer, pb.LoadAdapterRequest(ref="acme/a0", pin=True), None, admin)
        assert pinned.loaded and pinned.pinned
        with pytest.raises(PermissionDenied, match="pinned by an admin"):
            await unload(servicer, pb.AdapterRef(ref="a0"), None, tenant)
        still = cache.resident(AdapterRef("acme", "a0", 1))
        assert still is not None and still.pinned and still.pinned_by == "ops"
        await load(servicer, pb.LoadAdapterRequest(ref="a0"), None, tenant)  # a tenant's load leaves the pin
        assert cache.resident(AdapterRef("acme", "a0", 1)).pinned
        unloaded = await unload(servicer, pb.AdapterRef(ref="acme/a0"), None, admin)
        assert not unloaded.loaded and not unloaded.pinned
        await engine.stop()

    asyncio.run(body())


def test_unload_waits_for_the_requests_using_it(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=2, n_adapters=1)
        async with cache.lease(ref(0)):
            assert await cache.unload(ref(0))
            assert cache.resident(AdapterRef("acme", "a0", 1)) is not None
        assert cache.resident(AdapterRef("acme", "a0", 1)) is None
        await engine.stop()

    asyncio.run(body())


def test_drop_waits_for_requests_then_forgets_the_version_everywhere(
    tiny_bert_dir: Path, tmp_path: Path, files
) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=1, n_adapters=2)
        a0 = AdapterRef("acme", "a0", 1)
        await cache.load(a0, pinned_by="ops")
        async with cache.lease(a0):
            with pytest.raises(FailedPrecondition, match="serving 1 request; retry when"):
                await cache.drop(a0)
            assert cache.resident(a0) is not None
        await cache.drop(a0)
        assert cache.resident(a0) is None
        assert cache.weights.get(a0) is None
        assert (await cache.load(ref(1))).slot == 0  # the one slot is free again, pin and all
        reads = cache.store.reads
        await cache.load(a0)  # a version dropped and loaded again comes from the disk, not the host tier
        assert cache.store.reads == reads + 1
        await engine.stop()

    asyncio.run(body())


def test_drop_refuses_while_a_load_of_the_version_is_in_flight(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine, _ = await recorded_cache(tmp_path, tiny_bert_dir, files, 1, ["a"])
        installing = engine.hold_next("install")
        loading = asyncio.create_task(cache.load(v1("a")))
        await within(installing.wait())
        with pytest.raises(FailedPrecondition, match="retry when"):
            await cache.drop(v1("a"))
        engine.gate.set()
        await within(loading)
        await cache.drop(v1("a"))
        assert cache.resident(v1("a")) is None and cache.weights.get(v1("a")) is None
        assert engine.heads == {}

    asyncio.run(body())


def test_no_request_loads_a_version_back_while_it_is_being_deleted(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=2, n_adapters=2)
        a0, a1 = AdapterRef("acme", "a0", 1), AdapterRef("acme", "a1", 1)
        await cache.load(a0)
        async with cache.lease(a1):
            with pytest.raises(FailedPrecondition, match="a1@v1 is serving 1 request"):
                async with cache.deleting([a0, a1]):
                    pass
        assert cache.resident(a0) is not None, "a refused delete drops nothing"
        with pytest.raises(RuntimeError):
            async with cache.deleting([a0]):
                with pytest.raises(FailedPrecondition, match="being deleted"):
                    await cache.load(a0)
                raise RuntimeError("the store kept the version")
        assert (await cache.load(a0)).record.ref == a0, "a delete that failed leaves the version loadable"
        async with cache.deleting([a0]):
            assert cache.resident(a0) is None and cache.weights.get(a0) is None
            shutil.rmtree(cache.store.version_dir(a0))
        with pytest.raises(AdapterNotFound):
            await cache.load(a0)
        await engine.stop()

    asyncio.run(body())


def test_a_failed_load_leaves_every_slot_usable(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=1, n_adapters=1)
        (tmp_path / "acme" / "a0" / "v1" / "adapter_model.safetensors").write_bytes(b"corrupt")
        for _ in range(3):
            with pytest.raises(Exception, match="safetensors"):
                await cache.load(ref(0))
        cache.store.publish("acme", "good", files)
        assert (await cache.load(AdapterRef("acme", "good"))).slot == 0
        await engine.stop()

    asyncio.run(body())


MEMORY_CYCLES = 1000
MEMORY_BOUND_MIB = 64


@pytest.fixture(scope="module")
def wide_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM's width (384): a rank-64 adapter on it weighs 2.8 MiB, the size of a production adapter."""
    return make_tiny_bert(tmp_path_factory.mktemp("wide-bert"), hidden=384)


@pytest.fixture(scope="module")
def wide_files(wide_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("wide-adapter")
    make_peft_adapter(wide_bert_dir, out, num_labels=2, rank=64, seed=7)
    return adapter_files(out)


def test_memory_stays_flat_across_1000_load_unload_cycles(wide_bert_dir: Path, tmp_path: Path, wide_files) -> None:
    """Current resident memory (not the process's lifetime peak), before and after, with an adapter of
    megabytes: keeping even one in twenty of the adapters loaded would break the bound."""

    async def body() -> tuple[int, int]:
        base = load_base_model(wide_bert_dir, dtype="float32", device="cpu")
        store = AdapterStore(tmp_path, AdapterValidator(base.spec, 64, 8))
        for i in range(2):
            store.publish("acme", f"a{i}", wide_files)
        engine = Engine(base, EngineConfig(n_slots=2, max_rank=64, max_labels=8))
        engine.start()
        cache = AdapterCache(store, engine, 2, Metrics(), host_budget_bytes=0)  # every load reads and validates
        size = (await cache.load(ref(0))).record.size_bytes
        for i in range(50):
            await cache.load(ref(i % 2))
            await cache.unload(ref(i % 2))
        gc.collect()
        before = psutil.Process().memory_info().rss
        for i in range(MEMORY_CYCLES):
            await cache.load(ref(i % 2))
            await cache.unload(ref(i % 2))
        gc.collect()
        grown = psutil.Process().memory_info().rss - before
        await engine.stop()
        return size, grown

    size, grown = asyncio.run(body())
    print(f"resident memory growth over {MEMORY_CYCLES} load/unload cycles of a {size / 2**20:.1f} MiB adapter: "
          f"{grown / 2**20:.1f} MiB")
    assert size * MEMORY_CYCLES / 20 > MEMORY_BOUND_MIB * 2**20, "the adapter is too small for the bound to mean much"
    assert grown < MEMORY_BOUND_MIB * 2**20, f"resident memory grew {grown / 2**20:.1f} MiB"


def test_a_version_another_replica_deleted_and_published_again_is_never_served_from_memory(
    tiny_bert_dir: Path, tmp_path: Path, files
) -> None:
    """Replicas share the store: another one deletes a name and publishes it again, so `v1` names new
    weights. Here the old v1 is resident (and leased) and in the host tier: a request that begins after
    gets the new weights; the one already running keeps the old; the old slot is freed when it ends."""

    async def body() -> None:
        cache, engine, heads = await recorded_cache(tmp_path, tiny_bert_dir, files, 2, ["spam"])
        other = AdapterStore(tmp_path, cache.store.validator)
        spam = AdapterRef("acme", "spam")

        async def republish(scale: float) -> torch.Tensor:
            other.delete(spam, force=True)
            adapter = variant(files, scale)
            assert other.publish("acme", "spam", adapter).version == 1
            return cache.store.validator.parse(adapter).head_weight

        async with cache.lease(spam) as held:
            assert torch.equal(engine.heads[held.slot], heads["spam"])
            second = await republish(7.0)
            async with cache.lease(spam) as fresh:
                assert fresh is not held, "the old v1's slot served a request that began after it was deleted"
                assert torch.equal(engine.heads[fresh.slot], second)
            assert torch.equal(engine.heads[held.slot], heads["spam"]), "a running request keeps its version"
        assert held.slot not in engine.heads, "the old v1's slot is cleared once its last request ends"
        assert cache.resident(v1("spam")) is fresh
        await cache.unload(spam)  # its weights stay in the host tier
        third = await republish(9.0)
        assert torch.equal(engine.heads[(await cache.load(spam)).slot], third), "not the host tier's old v1"

    asyncio.run(body())
