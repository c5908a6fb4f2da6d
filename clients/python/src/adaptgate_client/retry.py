"""Retries that do what the server asks: its back-off trailer first, exponential back-off with jitter otherwise.

The gateway answers RESOURCE_EXHAUSTED (admission, quotas) with a `retry-after-ms` trailer; gRPC's own
convention is `grpc-retry-pushback-ms`. Both are honoured; a negative or unreadable value means "do not retry"
(gRPC's rule for pushback). Attempts are bounded, and so is the whole call: the caller's timeout is one
deadline across every attempt and wait, never a per-attempt budget.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import grpc

T = TypeVar("T")
PUSHBACK_KEYS = ("retry-after-ms", "grpc-retry-pushback-ms")
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _trailers(error: grpc.RpcError) -> Iterable[tuple[str, str | bytes]]:
    trailing = getattr(error, "trailing_metadata", None)
    return (trailing() if callable(trailing) else None) or ()


def server_pushback(error: grpc.RpcError) -> float | None:
    """Seconds the server asked us to wait; -1.0 when it said not to retry; None when it said nothing."""
    found = {key: value for key, value in _trailers(error) if key in PUSHBACK_KEYS}
    for key in PUSHBACK_KEYS:
        if key in found:
            value = found[key]
            try:
                millis = int(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return -1.0
            return millis / 1000.0 if millis >= 0 else -1.0
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """`max_attempts` counts the first try (1 = never retry). Without a server pushback, waits grow from
    `initial_backoff` by `multiplier` up to `max_backoff`, each drawn uniformly below that bound (full jitter),
    so clients turned away together do not come back together."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = field(default=RETRYABLE)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts counts the first try: it must be at least 1")

    def wait_before_retry(self, attempt: int, error: grpc.RpcError) -> float | None:
        """Seconds to wait after failed attempt `attempt` (1-based), or None when `error` is final."""
        if attempt >= self.max_attempts or _code(error) not in self.codes:
            return None
        pushback = server_pushback(error)
        if pushback is not None:
            return pushback if pushback >= 0 else None
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1)))


NO_RETRY = RetryPolicy(max_attempts=1)


class _Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def allows(self, wait: float) -> bool:
        """A wait that would end at or past the deadline is pointless: the next attempt could not run."""
        return self.at is None or time.monotonic() + wait < self.at


def call(policy: RetryPolicy, timeout: float | None, attempt_fn: Callable[[float | None], T]) -> T:
    """Runs `attempt_fn(time_left)` until it succeeds or the error is final; re-raises the last error."""
    deadline = _Deadline(timeout)
    attempt = 0
    while True:
        attempt += 1
        try:
            return attempt_fn(deadline.remaining())
        except grpc.RpcError as error:
            wait = policy.wait_before_retry(attempt, error)
            if wait is None or not deadline.allows(wait):
                raise
            time.sleep(wait)


def stream(
    policy: RetryPolicy, timeout: float | None, open_fn: Callable[[float | None], Iterable[T]], resumable: bool = False,
) -> Iterator[T]:
    """Yields a streaming call's responses; a failure is retried when nothing has been received yet, or
    always when `resumable` (the caller skips what it has already seen)."""
    deadline = _Deadline(timeout)
    attempt = 0
    received = False
    while True:
        attempt += 1
        try:
            for item in open_fn(deadline.remaining()):
                received = True
                yield item
            return
        except grpc.RpcError as error:
            wait = None if received and not resumable else policy.wait_before_retry(attempt, error)
            if wait is None or not deadline.allows(wait):
                raise
            time.sleep(wait)


async def acall(policy: RetryPolicy, timeout: float | None, attempt_fn: Callable[[float | None], Awaitable[T]]) -> T:
    """`call` for grpc.aio: the waits are asyncio sleeps, so the event loop keeps running."""
    deadline = _Deadline(timeout)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await attempt_fn(deadline.remaining())
        except grpc.RpcError as error:
            wait = policy.wait_before_retry(attempt, error)
            if wait is None or not deadline.allows(wait):
                raise
            await asyncio.sleep(wait)


async def astream(
    policy: RetryPolicy, timeout: float | None, open_fn: Callable[[float | None], AsyncIterator[T]], resumable: bool = False,
) -> AsyncIterator[T]:
    """`stream` for grpc.aio."""
    deadline = _Deadline(timeout)
    attempt = 0
    received = False
    while True:
        attempt += 1
        try:
            async for item in open_fn(deadline.remaining()):
                received = True
                yield item
            return
        except grpc.RpcError as error:
            wait = None if received and not resumable else policy.wait_before_retry(attempt, error)
            if wait is None or not deadline.allows(wait):
                raise
            await asyncio.sleep(wait)
