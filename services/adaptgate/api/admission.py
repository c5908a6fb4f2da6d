"""Admission: a request is counted, and refused if over a budget, before it costs anything.

Runs on the event loop when a request arrives, before its texts are tokenized or its adapters
resolved and leased, so a refusal costs microseconds and a burst of refused retries cannot eat the
CPU that admitted work needs. Every budget is per tenant and global:

- requests in flight per tenant (`max_inflight_per_tenant`);
- rows admitted and not yet answered, per tenant and in all (`max_queued_texts_per_tenant`,
  `max_queue_texts`): an Embed costs one row per text, a Classify one per text and adapter
  (an upper bound: head-only adapters share one forward, but which are is known only after resolving);
- distinct adapters leased by requests in flight, per tenant and in all (engine slots), so one
  tenant's many-adapter requests cannot pin every slot. The same adapter in many requests is one.

A request larger than a budget can never be admitted: INVALID_ARGUMENT at once, not a retry hint.
A request that would wait in the queue past its deadline is refused before it starts (`DeadlineTooShort`):
with fair turns its wait is its tenant's queued rows times the tenants queued, at the engine's measured
rate. Admitting it would spend the engine on rows whose answer nobody receives.

Refusals are cheap for our code but not for gRPC (a refused RPC still costs the server most of a
millisecond of event-loop time), so a client that retries at once, without backoff, could spend the
CPU the admitted work needs. Refusals are therefore paced (`RefusalPacer`): each tenant, and the
server as a whole, gets a rate of refusals answered at once; past it a refused request is held on a
timer (costing nothing) and answered in turn, so a retry storm slows itself to that rate.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Hashable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Protocol

from adaptgate.errors import InvalidArgument, QueueFull, ResourceExhausted
from adaptgate.settings import Settings


class TenantBusy(ResourceExhausted):
    """The tenant already has its limit of requests in flight."""


class TenantQueueFull(ResourceExhausted):
    """The tenant's admitted, unanswered texts would pass its budget."""


class TenantAdaptersBusy(ResourceExhausted):
    """The tenant's requests in flight already lease its budget of distinct adapters."""


class AdapterSlotsBusy(ResourceExhausted):
    """Requests in flight already lease as many distinct adapters as the engine has slots."""


class DeadlineTooShort(ResourceExhausted):
    """The queue ahead of the request holds more work than its deadline leaves time for."""


class MeasuredRate(Protocol):
    """The engine's rows per second (engine.rate.RowRate); None until measured."""

    @property
    def rows_per_second(self) -> float | None: ...


class _Unmeasured:
    rows_per_second: float | None = None


# Past this many tenants with a turn reserved, those whose turns are all past are dropped.
PACED_TENANTS_KEPT = 64
# A refusal whose turn comes after the client's deadline is answered before it, with this much of the
# time left to spare (the larger of the two), so it still reads RESOURCE_EXHAUSTED when the loop runs
# late. With less than twice REFUSAL_MARGIN_S left it is held to the deadline: an answer then would
# only invite an immediate retry.
REFUSAL_MARGIN_S = 0.1
REFUSAL_MARGIN_SHARE = 0.2


class RefusalPacer:
    """GCRA (the virtual-scheduling form of a token bucket) over refusals, per tenant and in all.

    `rate` refusals per second are answered at once, with a burst of one second's worth; each one
    past that is held until its turn. A request held never holds any budget: when its turn comes it
    is refused, and the client's retry meets admission afresh.
    """

    def __init__(self, rate_per_tenant: float, rate: float) -> None:
        self.rate_per_tenant = rate_per_tenant
        self.rate = rate
        self._due: dict[str, float] = {}  # tenant -> theoretical time of its next refusal
        self._due_all = 0.0

    def reserve(self, tenant: str, now: float) -> float:
        """Seconds to hold this refusal; reserves its turn."""
        held = 0.0
        if self.rate_per_tenant > 0:
            due = max(self._due.get(tenant, now), now)
            held = max(held, due - now - 1.0)  # the burst: one second's worth goes at once
            self._due[tenant] = due + 1.0 / self.rate_per_tenant
        if self.rate > 0:
            due = max(self._due_all, now)
            held = max(held, due - now - 1.0)
            self._due_all = due + 1.0 / self.rate
        self._forget_past(now)
        return held

    def _forget_past(self, now: float) -> None:
        """Tenants whose turns are all in the past need no entry (keeps the dict to the tenants refused lately)."""
        if len(self._due) > PACED_TENANTS_KEPT:
            self._due = {t: due for t, due in self._due.items() if due > now}


class TenantAdmission:
    """Counters only, touched on the event loop alone, so they need no lock. A limit of 0 means none."""

    def __init__(
        self,
        max_inflight_per_tenant: int,
        *,
        max_queued_texts: int = 0,
        max_queued_texts_per_tenant: int = 0,
        max_leased_adapters: int = 0,
        max_leased_adapters_per_tenant: int = 0,
        refusal_rate_per_tenant: float = 0.0,
        refusal_rate: float = 0.0,
        rate: MeasuredRate = _Unmeasured(),
    ) -> None:
        self.limit = max_inflight_per_tenant
        self.max_queued_texts = max_queued_texts
        self.max_queued_texts_per_tenant = max_queued_texts_per_tenant
        self.max_leased_adapters = max_leased_adapters
        self.max_leased_adapters_per_tenant = max_leased_adapters_per_tenant
        self._inflight: Counter[str] = Counter()
        self._rows: Counter[str] = Counter()
        self._total_rows = 0
        self._adapters: dict[str, Counter[Hashable]] = {}  # tenant -> adapter -> requests in flight
        self._all_adapters: Counter[Hashable] = Counter()
        self.pacer = RefusalPacer(refusal_rate_per_tenant, refusal_rate)
        self.rate = rate

    @classmethod
    def from_settings(cls, settings: Settings, rate: MeasuredRate = _Unmeasured()) -> TenantAdmission:
        """Global budgets are the engine's: its queue (max_queue_texts) and its slots (max_loaded_adapters)."""
        return cls(
            settings.max_inflight_per_tenant,
            max_queued_texts=settings.max_queue_texts,
            max_queued_texts_per_tenant=settings.max_queued_texts_per_tenant,
            max_leased_adapters=settings.max_loaded_adapters,
            max_leased_adapters_per_tenant=settings.max_leased_adapters_per_tenant,
            refusal_rate_per_tenant=settings.refusal_rate_per_tenant,
            refusal_rate=settings.refusal_rate,
            rate=rate,
        )

    @contextmanager
    def admit(self, tenant: str, rows: int = 0, adapters: Iterable[Hashable] = ()) -> Iterator[None]:
        """Holds the request's share of every budget until the block exits (answered, failed or cancelled)."""
        wanted = set(adapters)
        self._check_fits(rows, len(wanted))
        self._check_free(tenant, rows, wanted)
        self._take(tenant, rows, wanted)
        try:
            yield
        finally:
            self._give_back(tenant, rows, wanted)

    @asynccontextmanager
    async def admitted(
        self, tenant: str, rows: int = 0, adapters: Iterable[Hashable] = (), deadline: float | None = None
    ) -> AsyncIterator[None]:
        """`admit` for the RPC handlers: a refusal past the refusal rate waits its turn first, but is
        answered before the client's deadline (time.monotonic()) passes."""
        wanted = set(adapters)
        self._check_fits(rows, len(wanted))
        try:
            self._check_free(tenant, rows, wanted)
            self._check_in_time(tenant, rows, deadline)
        except ResourceExhausted:
            now = time.monotonic()
            if (held := _hold(self.pacer.reserve(tenant, now), None if deadline is None else deadline - now)) > 0:
                await asyncio.sleep(held)
            raise
        self._take(tenant, rows, wanted)
        try:
            yield
        finally:
            self._give_back(tenant, rows, wanted)

    def _check_fits(self, rows: int, adapters: int) -> None:
        """A request no budget can ever hold is the caller's to split, not to retry."""
        row_limit = min((n for n in (self.max_queued_texts_per_tenant, self.max_queued_texts) if n), default=0)
        if row_limit and rows > row_limit:
            raise InvalidArgument(
                f"the request needs {rows} rows (texts, times adapters for Classify) but at most {row_limit} "
                "may be queued at once; split it into smaller requests"
            )
        adapter_limit = min((n for n in (self.max_leased_adapters_per_tenant, self.max_leased_adapters) if n), default=0)
        if adapter_limit and adapters > adapter_limit:
            raise InvalidArgument(
                f"the request names {adapters} adapters but a tenant may use at most {_adapters(adapter_limit)} at once; "
                "split it into smaller requests"
            )

    def _check_free(self, tenant: str, rows: int, wanted: set[Hashable]) -> None:
        if self.limit and self._inflight[tenant] >= self.limit:
            raise TenantBusy(f"tenant {tenant!r} already has {self.limit} requests in flight; retry with backoff")
        if self.max_queued_texts_per_tenant and self._rows[tenant] + rows > self.max_queued_texts_per_tenant:
            raise TenantQueueFull(
                f"tenant {tenant!r} already has {self._rows[tenant]} texts queued, its limit is "
                f"{self.max_queued_texts_per_tenant}; retry with backoff"
            )
        if self.max_queued_texts and self._total_rows + rows > self.max_queued_texts:
            raise QueueFull(
                f"the server queue is full ({self._total_rows} texts waiting, limit {self.max_queued_texts}); "
                "retry with backoff"
            )
        held = self._adapters.get(tenant, {})
        if self.max_leased_adapters_per_tenant and len(held) + len(wanted - held.keys()) > self.max_leased_adapters_per_tenant:
            raise TenantAdaptersBusy(
                f"tenant {tenant!r} already uses {len(held)} distinct adapters in requests in flight, its limit is "
                f"{self.max_leased_adapters_per_tenant} distinct adapters; retry with backoff"
            )
        new = len(wanted - self._all_adapters.keys())
        if self.max_leased_adapters and new and len(self._all_adapters) + new > self.max_leased_adapters:
            raise AdapterSlotsBusy(
                f"requests in flight already use {len(self._all_adapters)} distinct adapters, as many as the "
                f"{self.max_leased_adapters} adapter slots; retry with backoff"
            )

    def _check_in_time(self, tenant: str, rows: int, deadline: float | None) -> None:
        """Deficit round robin gives each queued tenant an equal turn, so the tenant's own queue, times
        the tenants queued, is what runs before this request (never more than the whole queue)."""
        rate = self.rate.rows_per_second
        if deadline is None or not rate:
            return
        queued_tenants = len(self._rows) + (tenant not in self._rows)
        ahead = min(self._total_rows + rows, (self._rows[tenant] + rows) * queued_tenants)
        wait, left = ahead / rate, deadline - time.monotonic()
        if wait > left:
            raise DeadlineTooShort(
                f"about {wait:.1f} s of this tenant's work is queued ahead of the request's end, more than the "
                f"{max(left, 0.0):.1f} s left before its deadline; retry with backoff or a longer deadline"
            )

    def _take(self, tenant: str, rows: int, wanted: set[Hashable]) -> None:
        self._inflight[tenant] += 1
        self._rows[tenant] += rows
        self._total_rows += rows
        if wanted:
            self._adapters.setdefault(tenant, Counter()).update(wanted)
            self._all_adapters.update(wanted)

    def _give_back(self, tenant: str, rows: int, wanted: set[Hashable]) -> None:
        """Counters that reach zero are deleted, so a tenant that stops calling leaves nothing behind."""
        _decrement(self._inflight, tenant, 1)
        _decrement(self._rows, tenant, rows)
        self._total_rows -= rows
        if wanted:
            held = self._adapters[tenant]
            for adapter in wanted:
                _decrement(held, adapter, 1)
                _decrement(self._all_adapters, adapter, 1)
            if not held:
                del self._adapters[tenant]


def _hold(turn: float, left: float | None) -> float:
    """How long to hold a refusal whose turn is `turn` seconds away, the client's deadline `left` away."""
    if left is None:
        return turn
    answer_by = left - max(REFUSAL_MARGIN_S, left * REFUSAL_MARGIN_SHARE)
    if turn <= answer_by:
        return turn
    return answer_by if left >= 2 * REFUSAL_MARGIN_S else left


def _decrement(counter: Counter, key: Hashable, by: int) -> None:
    counter[key] -= by
    if counter[key] <= 0:
        del counter[key]


def _adapters(n: int) -> str:
    return f"{n} adapter" if n == 1 else f"{n} adapters"
