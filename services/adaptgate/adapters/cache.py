"""Adapters resident in the engine's slots: loaded once, leased per request, evicted LRU when idle.

A request resolves its reference (alias → version) once, at admission, and holds a lease on that
version's slot until its rows come back, so an alias flip never changes an in-flight answer and a
slot is never rewritten under a running batch. Pinned adapters are never evicted. Behind the slots
sits a byte-budgeted host tier of validated weights (`WeightsCache`), so a re-load skips the disk.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from adaptgate.adapters.format import AdapterWeights
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterRecord, AdapterStore
from adaptgate.adapters.weights_cache import WeightsCache
from adaptgate.engine.engine import Engine, HeadWeights
from adaptgate.errors import ResourceExhausted
from adaptgate.metrics import Metrics


@dataclass
class Resident:
    record: AdapterRecord
    slot: int
    has_head: bool
    has_lora: bool
    leases: int = 0
    pinned: bool = False
    unload_when_idle: bool = False


class AdapterCache:
    def __init__(
        self, store: AdapterStore, engine: Engine, n_slots: int, metrics: Metrics, host_budget_bytes: int = 512 << 20
    ) -> None:
        self.store = store
        self.engine = engine
        self.metrics = metrics
        self.weights = WeightsCache(host_budget_bytes)
        self._free = list(range(n_slots))
        self._resident: OrderedDict[AdapterRef, Resident] = OrderedDict()
        self._loading: dict[AdapterRef, asyncio.Future[Resident]] = {}
        self._lock = asyncio.Lock()  # guards slot accounting, never held across a load

    def resident(self, ref: AdapterRef) -> Resident | None:
        return self._resident.get(ref)

    @asynccontextmanager
    async def lease(self, ref: AdapterRef) -> AsyncIterator[Resident]:
        resident = await self.load(ref)
        resident.leases += 1
        self.metrics.count_adapter_request(f"{resident.record.tenant}/{resident.record.name}")
        try:
            yield resident
        finally:
            resident.leases -= 1
            if resident.leases == 0 and resident.unload_when_idle:
                await self._evict(resident.record.ref)

    async def load(self, ref: AdapterRef, pin: bool = False) -> Resident:
        """Concurrent loads of one version share a single load; a failed load leaves nothing behind."""
        concrete = await asyncio.to_thread(self.store.resolve, ref)
        resident = await self._load_once(concrete)
        resident.pinned = resident.pinned or pin
        resident.unload_when_idle = False
        return resident

    async def _load_once(self, concrete: AdapterRef) -> Resident:
        if (resident := self._resident.get(concrete)) is not None:
            self._resident.move_to_end(concrete)
            self.metrics.adapter_cache.labels("hit").inc()
            return resident
        if (pending := self._loading.get(concrete)) is not None:
            return await asyncio.shield(pending)
        self.metrics.adapter_cache.labels("miss").inc()
        future: asyncio.Future[Resident] = asyncio.get_running_loop().create_future()
        self._loading[concrete] = future
        try:
            resident = await self._load(concrete)
            future.set_result(resident)
            return resident
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters (if any) get it through the shield
            raise
        finally:
            del self._loading[concrete]

    async def _weights(self, ref: AdapterRef) -> AdapterWeights:
        if (weights := self.weights.get(ref)) is not None:
            return weights
        files = await asyncio.to_thread(self.store.read_files, ref)
        weights = await asyncio.to_thread(self.store.validator.parse, files)
        self.metrics.adapter_cache.labels("host_eviction").inc(self.weights.put(ref, weights))
        return weights

    async def _load(self, ref: AdapterRef) -> Resident:
        started = time.perf_counter()
        record = await asyncio.to_thread(self.store.get, ref)
        weights = await self._weights(ref)
        slot = await self._claim_slot()
        try:
            await self.engine.install(slot, weights.lora, weights.scaling, _head(weights))
        except BaseException:
            self._free.append(slot)
            raise
        resident = Resident(record, slot, weights.head_weight is not None, bool(weights.lora))
        self._resident[ref] = resident
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
        self.metrics.adapters_loaded.set(len(self._resident))
        return resident

    async def _claim_slot(self) -> int:
        async with self._lock:
            if self._free:
                return self._free.pop()
            for ref, resident in self._resident.items():  # oldest first
                if resident.leases == 0 and not resident.pinned:
                    await self._evict(ref)
                    self.metrics.adapter_cache.labels("eviction").inc()
                    return self._free.pop()
        raise ResourceExhausted(
            f"all {len(self._resident)} adapter slots are pinned or serving requests; retry shortly or unpin one"
        )

    async def _evict(self, ref: AdapterRef) -> None:
        resident = self._resident.pop(ref, None)
        if resident is None:
            return
        await self.engine.clear(resident.slot)
        self._free.append(resident.slot)
        self.metrics.adapters_loaded.set(len(self._resident))

    async def unload(self, ref: AdapterRef) -> bool:
        """Unpins and frees the slot now, or as soon as the requests using it finish. False if not loaded."""
        concrete = await asyncio.to_thread(self.store.resolve, ref)
        resident = self._resident.get(concrete)
        if resident is None:
            return False
        resident.pinned = False
        if resident.leases:
            resident.unload_when_idle = True
        else:
            await self._evict(concrete)
        return True


def _head(weights: AdapterWeights) -> HeadWeights | None:
    if weights.head_weight is None or weights.head_bias is None:
        return None
    return HeadWeights(weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
