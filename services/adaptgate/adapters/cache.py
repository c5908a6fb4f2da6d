"""Adapters resident in the engine's slots: loaded once, leased per request, evicted LRU when idle.

A request resolves its reference (alias → version) once, at admission, and holds a lease on that
version's slot until its rows come back, so an alias flip never changes an in-flight answer and a
slot is never rewritten under a running batch. Pinned adapters are never evicted. Behind the slots
sits a byte-budgeted host tier of validated weights (`WeightsCache`), so a re-load skips the disk.

Resolution is the store's, served from memory and checked against the disk on every call, so a
write made by another replica sharing the store is seen by the next request here. A resident (or a
host-tier entry) from an earlier publish of the same version number, its name deleted and published
again elsewhere, is retired, never served.

Every lease is taken in the same event-loop step that finds its adapter resident: on a hit, or, for
a request that waits on a load in flight, by the load itself as it lands. No other coroutine runs
between "resident" and "leased", so nothing can evict a slot a request is about to use.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from adaptgate.adapters.format import AdapterWeights
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterRecord, AdapterStore
from adaptgate.adapters.weights_cache import WeightsCache
from adaptgate.engine.engine import Engine, HeadWeights
from adaptgate.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted
from adaptgate.metrics import Metrics


@dataclass
class Resident:
    record: AdapterRecord
    slot: int
    has_head: bool
    has_lora: bool
    leases: int = 0
    pinned_by: str | None = None  # the (admin) tenant that pinned it; only an admin lifts a pin
    unload_when_idle: bool = False
    retired: bool = False  # out of the resident map (its version was published again); slot freed when idle

    @property
    def pinned(self) -> bool:
        return self.pinned_by is not None


@dataclass
class _Loading:
    """One load in flight. Requests waiting on it are counted here and their leases (and any pin)
    are put on the resident in the step the load lands, before any waiter runs again."""

    leases: int = 0
    pinned_by: str | None = None
    task: asyncio.Task[Resident] = field(init=False)


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
        self._loading: dict[AdapterRef, _Loading] = {}
        self._deleting: dict[AdapterRef, int] = {}  # versions no load may bring back until their delete ends
        self._lock = asyncio.Lock()  # guards slot claims, never held across a load

    def resident(self, ref: AdapterRef) -> Resident | None:
        return self._resident.get(ref)

    @asynccontextmanager
    async def lease(self, ref: AdapterRef) -> AsyncIterator[Resident]:
        resident = await self._acquire(ref, lease=True, pinned_by=None)
        self.metrics.count_adapter_request(f"{resident.record.tenant}/{resident.record.name}")
        try:
            yield resident
        finally:
            await self._release(resident)

    async def load(self, ref: AdapterRef, pinned_by: str | None = None) -> Resident:
        """Concurrent loads of one version share a single load; a failed load leaves nothing behind.

        `pinned_by` (an admin's tenant) pins it: never evicted until an admin unloads it.
        """
        return await self._acquire(ref, lease=False, pinned_by=pinned_by)

    async def _acquire(self, ref: AdapterRef, lease: bool, pinned_by: str | None) -> Resident:
        concrete, published = await self._resolve_published(ref)
        if concrete in self._deleting:
            raise FailedPrecondition(f"adapter {concrete} is being deleted; use another version")
        if (resident := self._resident.get(concrete)) is not None and resident.record.created_at != published:
            await self._retire(resident)
            resident = None
        if resident is not None:
            self._resident.move_to_end(concrete)
            self.metrics.adapter_cache.labels("hit").inc()
            resident.leases += lease
            resident.pinned_by = resident.pinned_by or pinned_by
            resident.unload_when_idle = False
            return resident
        loading = self._loading.get(concrete) or self._start_load(concrete)
        loading.leases += lease
        loading.pinned_by = loading.pinned_by or pinned_by
        try:
            return await asyncio.shield(loading.task)
        except asyncio.CancelledError:
            await self._abandon(loading, lease)
            raise

    async def _resolve_published(self, ref: AdapterRef) -> tuple[AdapterRef, float]:
        """On the event loop where the store is on a local disk (a thread hop costs more than the check)."""
        if self.store.local:
            return self.store.resolve_published(ref)
        return await asyncio.to_thread(self.store.resolve_published, ref)

    def _start_load(self, concrete: AdapterRef) -> _Loading:
        """The load runs as its own task: a caller that gives up does not cancel it for the others."""
        self.metrics.adapter_cache.labels("miss").inc()
        loading = _Loading()
        loading.task = asyncio.create_task(self._land(concrete, loading))
        loading.task.add_done_callback(_retrieve)
        self._loading[concrete] = loading
        return loading

    async def _land(self, concrete: AdapterRef, loading: _Loading) -> Resident:
        try:
            resident = await self._load(concrete)
        finally:
            del self._loading[concrete]
        resident.leases += loading.leases  # same step as the resident map entry: no eviction in between
        resident.pinned_by = resident.pinned_by or loading.pinned_by
        return resident

    async def _abandon(self, loading: _Loading, lease: bool) -> None:
        """A waiter was cancelled: withdraw its lease, or give it back if the load already handed it over."""
        if not loading.task.done():
            loading.leases -= lease
        elif lease and not loading.task.cancelled() and loading.task.exception() is None:
            await self._release(loading.task.result())

    async def _release(self, resident: Resident) -> None:
        resident.leases -= 1
        if resident.leases == 0 and resident.retired:
            await self._clear([resident])
        elif resident.leases == 0 and resident.unload_when_idle:
            await self._evict(resident)

    async def _retire(self, resident: Resident) -> None:
        """Its version number now names another publish: out of the map and the host tier in this step,
        so no request leases it again; its slot is freed now, or when the requests using it finish."""
        ref = resident.record.ref
        del self._resident[ref]
        self.weights.discard(ref)
        resident.retired = True
        if resident.leases == 0:
            await self._clear([resident])

    async def _weights(self, ref: AdapterRef, published: float) -> AdapterWeights:
        if (weights := self.weights.get(ref, published)) is not None:
            return weights
        files = await asyncio.to_thread(self.store.read_files, ref)
        weights = await asyncio.to_thread(self.store.validator.parse, files)
        self.metrics.adapter_cache.labels("host_eviction").inc(self.weights.put(ref, weights, published))
        return weights

    async def _load(self, ref: AdapterRef) -> Resident:
        started = time.perf_counter()
        record = await asyncio.to_thread(self.store.get, ref)
        weights = await self._weights(ref, record.created_at)
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
            for resident in self._resident.values():  # oldest first
                if resident.leases == 0 and not resident.pinned:
                    await self._evict(resident)
                    self.metrics.adapter_cache.labels("eviction").inc()
                    return self._free.pop()
        raise ResourceExhausted(
            f"all {len(self._resident)} adapter slots are pinned or serving requests; retry shortly or unpin one"
        )

    async def _evict(self, resident: Resident) -> None:
        """Only the resident still mapped under its reference: a stale handle never evicts its successor."""
        ref = resident.record.ref
        if self._resident.get(ref) is not resident:
            return
        del self._resident[ref]
        await self._clear([resident])

    async def _clear(self, residents: list[Resident]) -> None:
        for resident in residents:
            await self.engine.clear(resident.slot)
            self._free.append(resident.slot)
        self.metrics.adapters_loaded.set(len(self._resident))

    async def unload(self, ref: AdapterRef, may_unpin: bool = True) -> bool:
        """Unpins and frees the slot now, or as soon as the requests using it finish. False if not loaded.

        A pin is an operator's decision about a shared slot, so a caller that may not pin
        (`may_unpin=False`: a tenant) gets PERMISSION_DENIED for a pinned adapter, which stays pinned.
        """
        concrete = await asyncio.to_thread(self.store.resolve, ref)
        resident = self._resident.get(concrete)
        if resident is None:
            return False
        if resident.pinned and not may_unpin:
            raise PermissionDenied(
                f"adapter {concrete} is pinned by an admin to keep it loaded; ask an admin to unpin it"
            )
        resident.pinned_by = None
        if resident.leases:
            resident.unload_when_idle = True
        else:
            await self._evict(resident)
        return True

    async def drop(self, ref: AdapterRef) -> None:
        """Forget a version that is being deleted: its slot (pinned or not) and its host-tier weights.

        Refused while a request holds it or a load of it is in flight. The check and the removal
        from the resident map share one step, so no lease slips in between. A load that starts
        after this and before the store's delete can bring the version back; `deleting` closes that.
        """
        await self._clear(self._detach([ref]))

    @asynccontextmanager
    async def deleting(self, refs: Iterable[AdapterRef]) -> AsyncIterator[None]:
        """`drop` every version in `refs` (all or none), then refuse loads of them until the block ends.

        Run the store's delete inside the block: no request can load a version between its drop and
        its removal from disk, so no slot or host-tier entry outlives it (a name deleted and
        published again starts over at v1, and must not get the old weights).
        """
        refs = list(refs)
        residents = self._detach(refs)
        for ref in refs:
            self._deleting[ref] = self._deleting.get(ref, 0) + 1
        try:
            await self._clear(residents)
            yield
        finally:
            for ref in refs:
                self._deleting[ref] -= 1
                if not self._deleting[ref]:
                    del self._deleting[ref]

    def _detach(self, refs: list[AdapterRef]) -> list[Resident]:
        """Check every version is unused, then take each out of the resident map and the host tier.

        Synchronous on purpose: nothing can lease a version between its check and its removal.
        """
        for ref in refs:
            if ref.version is None:
                raise InvalidArgument(f"{ref} is not one version; name it as 'name@vN'")
            self._check_unused(ref)
        detached = []
        for ref in refs:
            self.weights.discard(ref)
            if (resident := self._resident.pop(ref, None)) is not None:
                detached.append(resident)
        return detached

    def _check_unused(self, ref: AdapterRef) -> None:
        resident, loading = self._resident.get(ref), self._loading.get(ref)
        requests = (resident.leases if resident else 0) + (loading.leases if loading else 0)
        if requests:
            plural = "request; retry when it finishes" if requests == 1 else "requests; retry when they finish"
            raise FailedPrecondition(f"adapter {ref} is serving {requests} {plural}")
        if loading is not None:
            raise FailedPrecondition(f"adapter {ref} is being loaded; retry when the load finishes")


def _retrieve(task: asyncio.Task[Resident]) -> None:
    """Its waiters re-raise a failed load; if all of them gave up, nobody is left to, and that is fine."""
    if not task.cancelled():
        task.exception()


def _head(weights: AdapterWeights) -> HeadWeights | None:
    if weights.head_weight is None or weights.head_bias is None:
        return None
    return HeadWeights(weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
