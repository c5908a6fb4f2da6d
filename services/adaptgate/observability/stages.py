"""Where one request's time goes, stage by stage: always on, so it has to cost next to nothing.

The serving code calls `lap()` where a stage starts and `mark(stage)` where it ends; the time between
goes to that stage. The clock is the monotonic wall clock (a vDSO read): a thread CPU clock would be a
system call per mark, which on a virtual machine costs more than several of the stages it would time.
Stages that run on the event loop without awaiting (auth, resolve, admission, answer, observe, and
decode/encode around the protobuf (de)serializers) are CPU work on that thread, so their wall time is
their CPU time plus what the GIL and the host take from it; tokenize (a worker thread) and lease (which
may wait for a load) await, so theirs includes waiting. The engine's part comes from the batcher's own
timestamps (engine.batcher.SubmitTiming): `queue_wait` from submit to the first forward pass, and
`forward` the request's share of each pass that ran its rows (the pass's time times its rows over the
pass's rows), so forward adds up across requests to the engine's busy time.

Outside a request (tests calling the servicers directly, the engine alone) every call is a no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar

# Stage names, in request order; the metric's `stage` label takes these values.
STAGES = (
    "decode", "auth", "resolve", "admission", "tokenize", "lease", "queue_wait", "forward", "answer", "observe", "encode",
)

StageSink = Callable[[str, str, float], None]  # (method, stage, seconds)


class StageTimes:
    """One request's stages; touched only by the request's own task (on the event loop thread)."""

    __slots__ = ("_last", "seconds")

    def __init__(self) -> None:
        self._last = time.perf_counter_ns()
        self.seconds: dict[str, float] = {}

    def lap(self) -> None:
        """A stage starts here (what ran since the last mark is nobody's)."""
        self._last = time.perf_counter_ns()

    def mark(self, stage: str) -> None:
        """`stage` ends here: it took the time since the last lap or mark."""
        now = time.perf_counter_ns()
        self.add(stage, (now - self._last) / 1e9)
        self._last = now

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


_current: ContextVar[StageTimes | None] = ContextVar("adaptgate_stages", default=None)


def begin() -> tuple[StageTimes, object]:
    """A new request's stages, current in this context until `end(token)`."""
    times = StageTimes()
    return times, _current.set(times)


def end(token: object) -> None:
    try:
        _current.reset(token)  # type: ignore[arg-type]
    except ValueError:  # a stream's generator closed from another context: the request ends with its task
        pass


def lap() -> None:
    times = _current.get()
    if times is not None:
        times.lap()


def mark(stage: str) -> None:
    times = _current.get()
    if times is not None:
        times.mark(stage)


class Timed:
    """Times a synchronous callable (the gRPC (de)serializers) into a sink, per method."""

    __slots__ = ("fn", "method", "stage", "sink")

    def __init__(self, fn: Callable[[object], object], method: str, stage: str, sink: StageSink) -> None:
        self.fn, self.method, self.stage, self.sink = fn, method, stage, sink

    def __call__(self, value: object) -> object:
        started = time.perf_counter_ns()
        try:
            return self.fn(value)
        finally:
            self.sink(self.method, self.stage, (time.perf_counter_ns() - started) / 1e9)
