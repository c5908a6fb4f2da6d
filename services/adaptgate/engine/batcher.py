"""Dynamic batching: rows from concurrent requests share forward passes.

Bounded by tokens per batch (padded tokens, or real ones where the forward is padding-free) and by
how long the first row waits; rows are grouped by length to cut padding. A full queue answers at
once (QueueFull) instead of queueing forever; rows whose caller went away or whose deadline passed
are dropped before compute. A batch that runs out of device memory is retried in halves, so only
the rows that cannot fit on their own fail (RESOURCE_EXHAUSTED) and their batch mates are answered.

Fair across tenants: every queue key (`Row.tenant`) has its own FIFO, and rows are taken from them
by deficit round robin with a quantum in tokens, so backlogged tenants share the forward passes'
tokens evenly and a light tenant's rows go into the next batch, however long a heavy tenant's
backlog. With a single tenant queued the batcher looks a few batches ahead (better length groups);
when another tenant arrives meanwhile, the rows not yet run go back to their queues and the next
take is a short one, one quantum per tenant queued, so the newcomer waits for the batch running
and a small batch of its own, not for the look-ahead or a full batch of someone else's rows. The
batch after that is half size: a tenant sending one request at a time is back before it ends.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from adaptgate.engine.rows import Row, RowResult
from adaptgate.errors import DeadlineExceeded, OutOfDeviceMemory, QueueFull

RunBatch = Callable[[list[Row]], list[RowResult]]

# A padding-free forward still lays its batch out as rows x longest row for the embeddings and the
# pooling (hidden-size wide, no FFN): that grid may reach this many times the token budget.
PADDING_FREE_GRID_FACTOR = 8
# Batches' worth of rows taken at once while one tenant alone is queued: more rows to group by length.
LOOKAHEAD_BATCHES = 4
# Deficit round robin: tokens a backlogged tenant may take per turn, as a share of the batch budget.
# Small enough that several tenants meet in one batch; a row longer than the quantum waits a few turns.
QUANTUM_SHARE = 8
# Each batch's weight in the speed estimate decays by this factor per later batch.
RATE_DECAY = 0.95


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


@dataclass
class BatchTiming:
    """One batch's forward pass as the batcher saw it (time.time_ns, the clock tracing uses)."""

    started_ns: int
    ended_ns: int
    rows: int  # all the batch's rows, every request's
    tokens: int


@dataclass
class SubmitTiming:
    """One `Batcher.submit`: when its rows were queued, the batches that ran them, when it was answered."""

    rows: int
    queued_ns: int
    answered_ns: int = 0
    batches: list[BatchTiming] = field(default_factory=list)
    # The submit's share of the forward passes: each pass's time times this submit's rows in it over its rows.
    forward_ns: float = 0.0


# A collector the API layer sets around one request: each submit made in that context appends its
# timing, so a request's queue wait and forward passes can be traced while the engine knows nothing of
# tracing. Unset (None), the batcher records nothing.
SUBMIT_TIMINGS: ContextVar[list[SubmitTiming] | None] = ContextVar("adaptgate_submit_timings", default=None)


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


class Round(enum.Enum):
    """How much the next take may hold (see Batcher._take_budget)."""

    NORMAL = "normal"  # a few batches' worth for a lone tenant, one batch's worth among several
    NEWCOMER = "newcomer"  # one quantum per tenant queued: a tenant that just arrived goes out at once
    SETTLING = "settling"  # half a batch: a tenant sending one request at a time comes back meanwhile


@dataclass
class BatcherLimits:
    max_batch_tokens: int
    max_wait_s: float
    max_queue_rows: int
    padding_free: bool = False  # the forward packs rows, so its cost is real tokens (engine.packed)
    max_batch_seconds: float = 0.0  # 0: batches are bounded by tokens alone (BatchBudget)

    @property
    def quantum_tokens(self) -> int:
        return max(1, self.max_batch_tokens // QUANTUM_SHARE)


# Below this many tokens a CPU forward loses more to per-batch overhead than a newcomer gains.
MIN_BATCH_TOKENS = 256


class BatchBudget:
    """Tokens per batch: max_batch_tokens, or fewer when the engine's measured speed says a batch that
    big would run longer than max_seconds. A tenant that arrives during a flood waits for the batch
    ahead of it (batches are not preempted), so a batch's duration bounds its latency; on a fast
    device the token limit binds first and nothing changes."""

    def __init__(self, max_tokens: int, max_seconds: float = 0.0, padding_free: bool = False,
                 min_tokens: int = MIN_BATCH_TOKENS) -> None:
        self.max_tokens, self.max_seconds, self.padding_free = max_tokens, max_seconds, padding_free
        self.min_tokens = min(min_tokens, max_tokens)
        self._tokens = self._seconds = 0.0

    def observe(self, stats: BatchStats) -> None:
        """Decayed sums, as RowRate keeps (about the last 20 batches count)."""
        cost = stats.tokens if self.padding_free else stats.padded_tokens
        self._tokens = self._tokens * RATE_DECAY + cost
        self._seconds = self._seconds * RATE_DECAY + stats.seconds

    @property
    def tokens(self) -> int:
        if self.max_seconds <= 0 or self._seconds <= 0:
            return self.max_tokens
        per_second = self._tokens / self._seconds
        return int(min(self.max_tokens, max(self.min_tokens, per_second * self.max_seconds)))


@dataclass
class _Pending:
    row: Row
    future: asyncio.Future[RowResult]
    batch: BatchTiming | None = None  # the forward pass that ran the row


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


class FairQueues:
    """Per-key FIFOs served by deficit round robin (Shreedhar & Varghese), the cost of a row its tokens.

    `active` holds the keys with queued rows in turn order; the key in front may be mid-turn (its
    quantum granted, some deficit left) when a take ran out of budget, and goes on next take.
    A key whose queue empties leaves the rotation and forgets its deficit, as DRR prescribes.
    """

    def __init__(self, quantum: int) -> None:
        self.quantum = quantum
        self.rows = 0  # queued rows, live or not, in all queues
        self._queues: dict[str, deque[_Pending]] = {}
        self._active: deque[str] = deque()
        self._deficit: dict[str, int] = {}
        self._turn: str | None = None  # the key in front whose quantum is granted for this turn

    @property
    def keys(self) -> int:
        return len(self._active)

    def __contains__(self, key: str) -> bool:
        return key in self._queues

    def push(self, item: _Pending) -> None:
        self._queue_of(item.row.tenant).append(item)
        self.rows += 1

    def push_front(self, items: list[_Pending]) -> None:
        """Rows taken but not run go back to the heads of their queues, in their order."""
        for item in reversed(items):
            self._queue_of(item.row.tenant).appendleft(item)
            self.rows += 1

    def _queue_of(self, key: str) -> deque[_Pending]:
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
            self._active.append(key)
            self._deficit[key] = 0
        return queue

    def take(self, budget: int) -> list[_Pending]:
        """Live rows worth about `budget` tokens in fair order; dead rows (cancelled, expired) are dropped."""
        taken: list[_Pending] = []
        while self._active and budget > 0:
            key = self._active[0]
            if self._turn != key:
                self._turn = key
                self._deficit[key] += self.quantum
            queue = self._queues[key]
            budget = self._serve(key, queue, budget, taken)
            if not queue:
                self._retire(key)
            elif budget <= 0 and self._deficit[key] >= len(queue[0].row.input_ids):
                break  # out of budget mid-turn: the turn goes on next take
            else:
                self._active.rotate(-1)
                self._turn = None
        return taken

    def _serve(self, key: str, queue: deque[_Pending], budget: int, taken: list[_Pending]) -> int:
        while queue and budget > 0:
            item = queue[0]
            if _dead(item):
                queue.popleft()
                self.rows -= 1
                continue
            cost = len(item.row.input_ids)
            if cost > self._deficit[key]:
                break
            queue.popleft()
            self.rows -= 1
            self._deficit[key] -= cost
            budget -= cost
            taken.append(item)
        return budget

    def _retire(self, key: str) -> None:
        self._active.popleft()
        del self._queues[key], self._deficit[key]
        self._turn = None


def _dead(item: _Pending) -> bool:
    """A row nobody waits for any more; an expired one is answered DEADLINE_EXCEEDED on the way out."""
    if item.future.done():
        return True
    if item.row.deadline is not None and time.monotonic() > item.row.deadline:
        item.future.set_exception(DeadlineExceeded("the request's deadline passed while it was queued"))
        return True
    return False


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
        self._queues = FairQueues(limits.quantum_tokens)
        self._budget = BatchBudget(limits.max_batch_tokens, limits.max_batch_seconds, limits.padding_free)
        self._running: set[str] = set()  # keys of the rows of the current take
        self._newcomer = False  # a key outside the current take queued rows meanwhile
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def queued_rows(self) -> int:
        return self._queues.rows

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def submit(self, rows: list[Row]) -> list[RowResult]:
        if self._queues.rows + len(rows) > self._limits.max_queue_rows:
            raise QueueFull(
                f"the server queue is full ({self._queues.rows} texts waiting, limit "
                f"{self._limits.max_queue_rows}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        queued_ns = time.time_ns()
        pending = [_Pending(row, loop.create_future()) for row in rows]
        for p in pending:
            self._newcomer = self._newcomer or (p.row.tenant not in self._running and p.row.tenant not in self._queues)
            self._queues.push(p)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            for p in pending:
                p.future.cancel()
            raise
        finally:
            _record_timing(pending, queued_ns)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._limits.max_wait_s > 0:
                await asyncio.sleep(self._limits.max_wait_s)
            kind = Round.NORMAL
            while self._queues.rows:
                kind = await self._round(loop, kind)

    def _take_budget(self, kind: Round) -> int:
        keys, budget = self._queues.keys, self._budget.tokens
        if kind is Round.NEWCOMER:
            return min(budget, self._queues.quantum * keys)
        if kind is Round.SETTLING:
            return budget // 2
        return budget * (LOOKAHEAD_BATCHES if keys <= 1 else 1)

    async def _round(self, loop: asyncio.AbstractEventLoop, kind: Round) -> Round:
        """One take, cut into batches by length; returns the kind of the next. A newcomer ends the
        take after the batch running, and the rows not run go back to the heads of their queues."""
        taken = self._queues.take(self._take_budget(kind))
        self._running = {p.row.tenant for p in taken}
        self._newcomer = False
        batches = plan_batches(taken, self._budget.tokens, self._limits.padding_free)
        try:
            for k, batch in enumerate(batches):
                if k and self._newcomer:
                    ran = {id(p) for b in batches[:k] for p in b}
                    self._queues.push_front([p for p in taken if id(p) not in ran])
                    break
                await self._run(loop, batch)
        finally:
            self._running = set()
        if self._newcomer:
            return Round.NEWCOMER
        return Round.SETTLING if kind is Round.NEWCOMER else Round.NORMAL

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        batch = [p for p in batch if not p.future.done()]
        if not batch:
            return
        rows = [p.row for p in batch]
        started, started_ns = time.perf_counter(), time.time_ns()
        try:
            results = await loop.run_in_executor(self._executor, run_splitting_on_oom, self._run_batch, rows)
        except Exception as exc:  # a failed batch fails its requests, never the batcher
            _stamp(batch, started_ns)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        _stamp(batch, started_ns)
        stats = BatchStats.of(rows, time.perf_counter() - started)
        self._budget.observe(stats)
        self._on_batch(stats)
        for p, result in zip(batch, results):
            if p.future.done():
                continue
            if isinstance(result, Exception):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)


def _stamp(batch: list[_Pending], started_ns: int) -> None:
    """Marks each row with its forward pass, before its future resolves, so its submit sees it."""
    timing = BatchTiming(started_ns, time.time_ns(), len(batch), sum(len(p.row.input_ids) for p in batch))
    for p in batch:
        p.batch = timing


def _record_timing(pending: list[_Pending], queued_ns: int) -> None:
    """Appends one submit's timing to the caller's collector (SUBMIT_TIMINGS), when one is set."""
    collector = SUBMIT_TIMINGS.get()
    if collector is None:
        return
    batches = list({id(p.batch): p.batch for p in pending if p.batch is not None}.values())
    share = sum((p.batch.ended_ns - p.batch.started_ns) / p.batch.rows for p in pending if p.batch is not None)
    collector.append(SubmitTiming(len(pending), queued_ns, time.time_ns(), batches, share))
