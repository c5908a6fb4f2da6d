"""The dynamic batcher: token-bounded, length-grouped, bounded queue, deadlines, failures contained."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adaptgate.engine.batcher import BatchBudget, Batcher, BatcherLimits, BatchStats, _Pending, is_out_of_memory, plan_batches
from adaptgate.engine.rows import Row, RowResult
from adaptgate.errors import DeadlineExceeded, OutOfDeviceMemory, QueueFull


def pending(lengths: list[int]) -> list[_Pending]:
    loop = asyncio.new_event_loop()
    return [_Pending(Row([0] * n), loop.create_future()) for n in lengths]


def test_batches_stay_within_the_token_budget_and_group_by_length() -> None:
    batches = plan_batches(pending([5, 100, 6, 90, 7, 95]), max_batch_tokens=200)
    for batch in batches:
        width = max(len(p.row.input_ids) for p in batch)
        assert width * len(batch) <= 200
    assert [sorted(len(p.row.input_ids) for p in b) for b in batches] == [[5, 6, 7], [90, 95], [100]]


def test_padding_free_batches_count_real_tokens_and_bound_the_grid() -> None:
    """Packed rows cost their own tokens: 40 short rows and one long one share a pass a padded
    forward would split; the grid (rows x longest) still stays within 8x the budget."""
    lengths = [10] * 40 + [120]
    assert len(plan_batches(pending(lengths), max_batch_tokens=640)) == 2  # padded: 41 x 120 > 640
    [batch] = plan_batches(pending(lengths), max_batch_tokens=640, padding_free=True)
    assert len(batch) == 41
    for batch in plan_batches(pending([10] * 100 + [120] * 3), max_batch_tokens=600, padding_free=True):
        real = sum(len(p.row.input_ids) for p in batch)
        assert real <= 600 and len(batch) * max(len(p.row.input_ids) for p in batch) <= 8 * 600


class Recorder:
    """A fake forward: records batch sizes, optionally blocks until released; `entered` is set once a batch runs."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.gate = gate
        self.fail = fail
        self.entered = threading.Event()

    def __call__(self, rows: list[Row]) -> list[RowResult]:
        self.entered.set()
        if self.gate:
            self.gate.wait(5)
        if self.fail:
            raise RuntimeError("boom")
        self.sizes.append(len(rows))
        return [RowResult(probabilities=None, embedding=None) for _ in rows]


async def submitted(batcher: Batcher, rows: list[Row]) -> asyncio.Task[list[RowResult]]:
    """Submits in a task and returns once the rows are queued: the task's first step (which queues them)
    was scheduled before the marker's callback, and the loop runs callbacks in order."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(batcher.submit(rows))
    marker = loop.create_future()
    loop.call_soon(marker.set_result, None)
    await marker
    return task


async def running(recorder: Recorder) -> None:
    """Waits until the fake forward has a batch in hand."""
    assert await asyncio.to_thread(recorder.entered.wait, 5), "no batch reached the forward"


async def with_batcher(run, limits: BatcherLimits, body):
    executor = ThreadPoolExecutor(1)
    batcher = Batcher(run, executor, limits)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()
        executor.shutdown()


def test_concurrent_requests_share_forward_passes() -> None:
    recorder = Recorder()

    async def body(batcher: Batcher) -> None:
        await asyncio.gather(*(batcher.submit([Row([1, 2, 3])]) for _ in range(20)))

    asyncio.run(with_batcher(recorder, BatcherLimits(10_000, 0.01, 100), body))
    assert sum(recorder.sizes) == 20 and len(recorder.sizes) < 20


def test_full_queue_rejects_at_once() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def body(batcher: Batcher) -> None:
        first = await submitted(batcher, [Row([1])] * 4)
        await running(recorder)  # the first batch is running (blocked); now fill the queue
        queued = await submitted(batcher, [Row([1])] * 4)
        assert batcher.queued_rows == 4
        started = time.monotonic()
        with pytest.raises(QueueFull, match="queue is full"):
            await batcher.submit([Row([1])])
        assert time.monotonic() - started < 0.1
        gate.set()
        await asyncio.gather(first, queued)

    asyncio.run(with_batcher(recorder, BatcherLimits(10_000, 0.0, 4), body))


def test_expired_rows_never_reach_the_model() -> None:
    recorder = Recorder()

    async def body(batcher: Batcher) -> None:
        with pytest.raises(DeadlineExceeded):
            await batcher.submit([Row([1], deadline=time.monotonic() - 1)])

    asyncio.run(with_batcher(recorder, BatcherLimits(10_000, 0.0, 10), body))
    assert recorder.sizes == []


def test_a_failing_batch_fails_its_requests_and_the_batcher_lives_on() -> None:
    recorder = Recorder(fail=True)

    async def body(batcher: Batcher) -> None:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit([Row([1])])
        recorder.fail = False
        assert len(await batcher.submit([Row([1]), Row([2])])) == 2

    asyncio.run(with_batcher(recorder, BatcherLimits(10_000, 0.0, 10), body))


def test_a_cancelled_request_is_dropped_before_compute() -> None:
    gate = threading.Event()
    recorder = Recorder(gate)

    async def body(batcher: Batcher) -> None:
        first = await submitted(batcher, [Row([1])])
        await running(recorder)  # the first batch is running (blocked)
        doomed = await submitted(batcher, [Row([2])] * 3)
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)  # its rows' futures are cancelled now
        assert batcher.queued_rows == 3  # still queued: dropped when the batcher reaches them
        gate.set()
        await first
        assert len(await batcher.submit([Row([3])])) == 1
        assert batcher.queued_rows == 0

    asyncio.run(with_batcher(recorder, BatcherLimits(10_000, 0.0, 10), body))
    assert recorder.sizes == [1, 1]  # the cancelled request's 3 rows never ran


def test_engine_refuses_to_start_when_one_max_length_input_cannot_fit(tiny_bert_dir) -> None:
    from adaptgate.engine.engine import Engine, EngineConfig
    from adaptgate.engine.model import load_base_model

    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="cannot hold one 128-token input"):
        Engine(base, EngineConfig(max_batch_tokens=64))


class RunsOutOfMemory(Recorder):
    """A fake forward whose device has room for rows of up to `fits` tokens only, as a GPU would."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.fits = fits

    def __call__(self, rows: list[Row]) -> list[RowResult]:
        if any(len(r.input_ids) > self.fits for r in rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().__call__(rows)


def test_out_of_memory_fails_only_the_request_that_cannot_fit() -> None:
    """RELIABILITY 29: the batch is retried in halves; its mates are answered and the next request runs."""
    forward = RunsOutOfMemory(fits=8)

    async def body(batcher: Batcher) -> None:
        small = [batcher.submit([Row([1] * 3), Row([1] * 5)]) for _ in range(3)]
        huge = batcher.submit([Row([1] * 4), Row([1] * 40)])
        results = await asyncio.gather(*small, huge, return_exceptions=True)
        assert all(isinstance(r, list) and len(r) == 2 for r in results[:3]), results
        assert isinstance(results[3], OutOfDeviceMemory) and "40-token input" in str(results[3])
        assert len(await batcher.submit([Row([1] * 6)])) == 1

    asyncio.run(with_batcher(forward, BatcherLimits(10_000, 0.01, 100), body))
    assert sum(forward.sizes) == 3 * 2 + 1 + 1  # every row that fits ran exactly once


def test_a_cpu_allocation_failure_counts_as_out_of_memory() -> None:
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("boom"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the real allocator's out-of-memory error")
def test_a_real_cuda_out_of_memory_fails_only_its_request() -> None:
    """RELIABILITY 29 on a GPU: the allocator's own error, raised by an impossible allocation for one row."""

    def forward(rows: list[Row]) -> list[RowResult]:
        if any(len(r.input_ids) > 8 for r in rows):
            torch.empty(1 << 46, dtype=torch.uint8, device="cuda")  # 64 TiB
        return [RowResult() for _ in rows]

    async def body(batcher: Batcher) -> None:
        results = await asyncio.gather(batcher.submit([Row([1] * 3)]), batcher.submit([Row([1] * 40)]), return_exceptions=True)
        assert isinstance(results[0], list) and isinstance(results[1], OutOfDeviceMemory), results
        assert len(await batcher.submit([Row([1] * 2)])) == 1

    asyncio.run(with_batcher(forward, BatcherLimits(10_000, 0.01, 100), body))


def test_on_a_slow_engine_a_batch_holds_only_max_batch_seconds_of_work() -> None:
    budget = BatchBudget(2048, max_seconds=0.1, min_tokens=16)
    assert budget.tokens == 2048  # nothing measured yet
    budget.observe(BatchStats(rows=10, tokens=500, padded_tokens=500, adapters=0, seconds=1.0))
    assert budget.tokens == 50  # 500 tokens/s x 0.1 s
    budget.observe(BatchStats(rows=10, tokens=100_000, padded_tokens=100_000, adapters=0, seconds=1.0))
    assert budget.tokens == 2048  # a fast engine: the token limit binds
    assert BatchBudget(2048, max_seconds=0.0).tokens == 2048


def test_the_batcher_cuts_batches_by_the_measured_speed() -> None:
    recorder = Recorder()
    limits = BatcherLimits(10_000, 0.0, 1000, max_batch_seconds=0.5)

    async def body(batcher: Batcher) -> None:
        # Seen so far: 100 padded tokens a second, so half a second holds 50 tokens: 5 rows of 10.
        batcher._budget = BatchBudget(10_000, 0.5, min_tokens=10)
        batcher._budget.observe(BatchStats(rows=1, tokens=100, padded_tokens=100, adapters=0, seconds=1.0))
        await batcher.submit([Row([1] * 10) for _ in range(20)])

    asyncio.run(with_batcher(recorder, limits, body))
    assert recorder.sizes[0] == 5 and sum(recorder.sizes) == 20
