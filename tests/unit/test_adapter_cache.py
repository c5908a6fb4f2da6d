"""The slot cache: one load for concurrent callers, LRU eviction of idle adapters only, pins, failed loads
that leave no trace, and flat memory across many load/unload cycles (RELIABILITY 17, 18, 20, 21)."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import pytest

from adaptgate.adapters.cache import AdapterCache
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.model import load_base_model
from adaptgate.errors import ResourceExhausted
from adaptgate.metrics import Metrics
from tests.unit.peft_adapters import adapter_files, make_peft_adapter


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
        await cache.load(ref(0), pin=True)
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


def test_unload_waits_for_the_requests_using_it(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> None:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=2, n_adapters=1)
        async with cache.lease(ref(0)):
            assert await cache.unload(ref(0))
            assert cache.resident(AdapterRef("acme", "a0", 1)) is not None
        assert cache.resident(AdapterRef("acme", "a0", 1)) is None
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


def test_memory_stays_flat_across_1000_load_unload_cycles(tiny_bert_dir: Path, tmp_path: Path, files) -> None:
    async def body() -> int:
        cache, engine = await make_cache(tiny_bert_dir, tmp_path, files, n_slots=2, n_adapters=2)
        cache.weights.budget_bytes = 0  # every load reads and validates again: the worst case
        for i in range(100):
            await cache.load(ref(i % 2))
            await cache.unload(ref(i % 2))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for i in range(1000):
            await cache.load(ref(i % 2))
            await cache.unload(ref(i % 2))
        await engine.stop()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before

    grown_kib = asyncio.run(body())
    print(f"resident memory growth over 1,000 load/unload cycles after warm-up: {grown_kib / 1024:.1f} MiB")
    assert grown_kib < 100 * 1024, f"resident memory grew {grown_kib / 1024:.1f} MiB"
