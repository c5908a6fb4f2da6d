"""Fair batching: per-tenant queues served by deficit round robin, so a light tenant is never stuck
behind a heavy tenant's backlog and backlogged tenants share the forward passes' tokens evenly."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from hypothesis import given, settings
from hypothesis import strategies as st

from adaptgate.engine.batcher import Batcher, BatcherLimits, FairQueues, _Pending
from adaptgate.engine.rows import Row, RowResult
from tests.unit.test_batcher import submitted

WAIT_S = 5.0


class GatedForward:
    """A fake forward that reports each batch as it starts and runs it only once a permit is given."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.started: asyncio.Queue[list[Row]] = asyncio.Queue()
        self.permits = threading.Semaphore(0)
        self.batches: list[list[Row]] = []

    def __call__(self, rows: list[Row]) -> list[RowResult]:
        self.loop.call_soon_threadsafe(self.started.put_nowait, rows)
        if not self.permits.acquire(timeout=WAIT_S):
            raise TimeoutError("the test never let this batch run")
        self.batches.append(rows)
        return [RowResult() for _ in rows]

    async def next_batch(self) -> list[Row]:
        """Waits until a batch reaches the forward, then lets it run."""
        rows = await asyncio.wait_for(self.started.get(), WAIT_S)
        self.permits.release()
        return rows


def rows(tenant: str, count: int, tokens: int) -> list[Row]:
    return [Row([1] * tokens, tenant=tenant) for _ in range(count)]


async def test_a_light_tenants_rows_run_before_a_heavy_tenants_backlog_drains() -> None:
    """The light row arrives while a heavy batch runs and 11 more heavy batches wait; it runs next."""
    forward = GatedForward(asyncio.get_running_loop())
    executor = ThreadPoolExecutor(1)
    batcher = Batcher(forward, executor, BatcherLimits(max_batch_tokens=100, max_wait_s=0.0, max_queue_rows=1000))
    batcher.start()
    try:
        heavy = [asyncio.ensure_future(batcher.submit(rows("heavy", 1, 100))) for _ in range(12)]
        first = await asyncio.wait_for(forward.started.get(), WAIT_S)  # a heavy batch is running
        assert [r.tenant for r in first] == ["heavy"]
        light = await submitted(batcher, rows("light", 1, 10))
        forward.permits.release()
        order = [[r.tenant for r in await forward.next_batch()] for _ in range(12)]
        await asyncio.wait_for(asyncio.gather(*heavy, light), WAIT_S)
    finally:
        await batcher.stop()
        executor.shutdown()
    light_at = next(i for i, batch in enumerate(order) if "light" in batch)
    assert light_at == 0, f"the light row ran after {light_at} more heavy batches: {order}"
    assert sum(len(b) for b in forward.batches) == 13  # every row ran exactly once
    assert batcher.queued_rows == 0


async def test_backlogged_tenants_share_tokens_evenly() -> None:
    """Three tenants with backlogs of different row lengths, queued in order a, b, c: until the first
    backlog drains, each has had about the same tokens (FIFO would serve a's backlog alone first)."""
    forward = GatedForward(asyncio.get_running_loop())
    executor = ThreadPoolExecutor(1)
    limits = BatcherLimits(max_batch_tokens=200, max_wait_s=0.0, max_queue_rows=10_000)
    batcher = Batcher(forward, executor, limits)
    batcher.start()
    lengths = {"a": 10, "b": 40, "c": 25}
    try:
        blocker = await submitted(batcher, rows("z", 1, 5))
        await asyncio.wait_for(forward.started.get(), WAIT_S)  # the engine is busy: what follows queues up
        backlogs = [await submitted(batcher, rows(t, 1, n)) for t, n in lengths.items() for _ in range(2000 // n)]
        assert batcher.queued_rows == sum(2000 // n for n in lengths.values())  # a's rows first, then b's, then c's
        forward.permits.release()
        served: Counter[str] = Counter()
        remaining = {t: 2000 // n for t, n in lengths.items()}
        while all(remaining.values()):
            for row in await forward.next_batch():
                served[row.tenant] += len(row.input_ids)
                remaining[row.tenant] -= 1
        forward.permits.release(sum(remaining.values()))  # at most one batch per row is left
        await asyncio.wait_for(asyncio.gather(blocker, *backlogs), WAIT_S)
    finally:
        await batcher.stop()
        executor.shutdown()
    shares = [served[t] for t in lengths]
    assert min(shares) >= 0.8 * max(shares), f"tokens per tenant before the first backlog drained: {dict(served)}"


@settings(max_examples=200, deadline=None)
@given(
    backlogs=st.lists(st.lists(st.integers(1, 64), min_size=1, max_size=40), min_size=2, max_size=4),
    quantum=st.integers(8, 160),
    budgets=st.lists(st.integers(1, 400), min_size=1, max_size=8),
)
def test_deficit_round_robin_serves_each_row_once_in_order_and_keeps_tenants_within_a_quantum(
    backlogs: list[list[int]], quantum: int, budgets: list[int]
) -> None:
    """DRR's bound: while every tenant is backlogged, any two have been served within quantum + longest row."""
    loop = asyncio.new_event_loop()
    try:
        queues = FairQueues(quantum)
        for t, lengths in enumerate(backlogs):
            for i, n in enumerate(lengths):
                queues.push(_Pending(Row([i] * n, tenant=f"t{t}"), loop.create_future()))
        served: Counter[str] = Counter()
        left = Counter({f"t{t}": len(lengths) for t, lengths in enumerate(backlogs)})
        seen: dict[str, list[int]] = {f"t{t}": [] for t in range(len(backlogs))}
        longest = max(max(lengths) for lengths in backlogs)
        k = 0
        while queues.rows:
            taken = queues.take(budgets[k % len(budgets)])
            k += 1
            assert taken, "a take with rows queued and budget left took nothing"
            for p in taken:
                served[p.row.tenant] += len(p.row.input_ids)
                left[p.row.tenant] -= 1
                seen[p.row.tenant].append(p.row.input_ids[0])
            if all(left[t] > 0 for t in seen):
                assert max(served.values()) - min(served[t] for t in seen) <= quantum + longest, dict(served)
        assert all(order == list(range(len(backlogs[t]))) for t, order in enumerate(seen.values()))
    finally:
        loop.close()
