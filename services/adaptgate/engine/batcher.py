"""Dynamic batching: rows from concurrent requests share forward passes.

Bounded by tokens per batch (padded tokens, or real ones where the forward is padding-free) and by
how long the first row waits; rows are grouped by length to cut padding. A full queue answers at
once (QueueFull) instead of queueing forever; rows whose caller went away or whose deadline passed
are dropped before compute. A batch that runs out of device memory is retried in halves, so only
the rows that cannot fit on their own fail (RESOURCE_EXHAUSTED) and their batch mates are answered.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from adaptgate.engine.rows import Row, RowResult
from adaptgate.errors import DeadlineExceeded, OutOfDeviceMemory, QueueFull

RunBatch = Callable[[list[Row]], list[RowResult]]

# A padding-free forward still lays its batch out as rows x longest row for the embeddings and the
# pooling (hidden-size wide, no FFN): that grid may reach this many times the token budget.
PADDING_FREE_GRID_FACTOR = 8


@dataclass
class BatchStats:
    rows: int
    tokens: int  # real tokens
    padded_tokens: int  # rows x longest row
    adapters: int  # distinct adapter slots in the batch
    seconds: float = 0.0  # the forward pass, on the engine thread

    @classmethod
    def of(cls, rows: list[Row], seconds: float = 0.0) -> BatchStats:
        slots = {r.lora_slot for r in rows if r.lora_slot >= 0} | {s for r in rows for s in r.head_slots}
        tokens = sum(len(r.input_ids) for r in rows)
        return cls(len(rows), tokens, len(rows) * max(len(r.input_ids) for r in rows), len(slots), seconds)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; the CPU allocator raises a RuntimeError that says so."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def run_splitting_on_oom(run_batch: RunBatch, rows: list[Row]) -> list[RowResult | Exception]:
    """Each row's result, or OutOfDeviceMemory for the rows that do not fit even alone."""
    try:
        return list(run_batch(rows))
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(rows) == 1:
        tokens = len(rows[0].input_ids)
        return [OutOfDeviceMemory(f"the model ran out of device memory on one {tokens}-token input; send a shorter text")]
    half = len(rows) // 2
    return run_splitting_on_oom(run_batch, rows[:half]) + run_splitting_on_oom(run_batch, rows[half:])


@dataclass
class BatcherLimits:
    max_batch_tokens: int
    max_wait_s: float
    max_queue_rows: int
    padding_free: bool = False  # the forward packs rows, so its cost is real tokens (engine.packed)


@dataclass
class _Pending:
    row: Row
    future: asyncio.Future[RowResult]


def plan_batches(items: list[_Pending], max_batch_tokens: int, padding_free: bool = False) -> list[list[_Pending]]:
    """Sort by length, then cut so that rows × longest row stays within the token budget, or for a
    padding-free forward, so that the real tokens do (and rows × longest within PADDING_FREE_GRID_FACTOR times it)."""
    grid_budget = max_batch_tokens * (PADDING_FREE_GRID_FACTOR if padding_free else 1)
    batches: list[list[_Pending]] = []
    current: list[_Pending] = []
    real = 0
    for item in sorted(items, key=lambda p: len(p.row.input_ids)):
        width = len(item.row.input_ids)
        too_many = padding_free and real + width > max_batch_tokens
        if current and (too_many or width * (len(current) + 1) > grid_budget):
            batches.append(current)
            current, real = [], 0
        current.append(item)
        real += width
    if current:
        batches.append(current)
    return batches


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        executor: Executor,
        limits: BatcherLimits,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
    ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self._limits = limits
        self._on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, rows: list[Row]) -> list[RowResult]:
        if len(self._queue) + len(rows) > self._limits.max_queue_rows:
            raise QueueFull(
                f"the server queue is full ({len(self._queue)} texts waiting, limit "
                f"{self._limits.max_queue_rows}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        pending = [_Pending(row, loop.create_future()) for row in rows]
        self._queue.extend(pending)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            for p in pending:
                p.future.cancel()
            raise

    def _take(self) -> list[_Pending]:
        """Up to a few batches' worth of live rows; the rest wait for the next round."""
        budget = self._limits.max_batch_tokens * 4
        taken: list[_Pending] = []
        while self._queue and budget > 0:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.row.deadline is not None and time.monotonic() > item.row.deadline:
                item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
                continue
            taken.append(item)
            budget -= len(item.row.input_ids)
        return taken

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._limits.max_wait_s > 0:
                await asyncio.sleep(self._limits.max_wait_s)
            while self._queue:
                for batch in plan_batches(self._take(), self._limits.max_batch_tokens, self._limits.padding_free):
                    await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        rows = [p.row for p in batch]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, run_splitting_on_oom, self._run_batch, rows)
        except Exception as exc:  # a failed batch fails its requests, never the batcher
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        self._on_batch(BatchStats.of(rows, time.perf_counter() - started))
        for p, result in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
