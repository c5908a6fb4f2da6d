"""What every RPC shares: authentication, error → status mapping, and per-method metrics.

Servicer methods are written as `async def Method(self, request, context, principal)` and
decorated with `unary` or `server_stream`; the decorator gives gRPC the usual signature.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from adaptgate.api.admission import TenantAdmission
from adaptgate.api.auth import Principal, TokenAuthenticator
from adaptgate.api.malformed import Malformed
from adaptgate.api.errors import status_of
from adaptgate.errors import AdaptgateError, ErrorCode, InvalidArgument
from adaptgate.metrics import Metrics
from adaptgate.observability import stages
from adaptgate.observability.requests import current_request_id, note

log = logging.getLogger("adaptgate.rpc")
# Trailing metadata on RESOURCE_EXHAUSTED: how long a well-behaved client should back off.
RETRY_AFTER_KEY = "retry-after-ms"
RETRY_AFTER_MS = 250
T = TypeVar("T")
# Exceptions a call's body raises that pass through as they are, not through `_Call.fail`.
PASS_THROUGH = (grpc.aio.AbortError, GeneratorExit)


@dataclass
class RpcRuntime:
    auth: TokenAuthenticator
    metrics: Metrics
    admission: TenantAdmission


class _Call:
    """One RPC's bookkeeping: who called, how it ended, how long it took."""

    def __init__(self, servicer: Any, method: str, context: grpc.aio.ServicerContext) -> None:
        self.runtime: RpcRuntime = servicer.runtime
        self.method = method
        self.context = context
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()

    def principal(self) -> Principal:
        principal = self.runtime.auth.authenticate(self.context.invocation_metadata())
        note(tenant=principal.tenant)  # for the access line and the trace (observability)
        stages.mark("auth")
        return principal

    async def fail(self, exc: BaseException) -> None:
        """Abort with the mapped status; unknown errors become INTERNAL with an id that points at the log."""
        if isinstance(exc, asyncio.CancelledError):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, AdaptgateError):
            self.code = status_of(exc)
            if exc.code in (ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.DEADLINE_EXCEEDED):
                reason = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
                self.runtime.metrics.rejected.labels(reason).inc()
            if exc.code is ErrorCode.RESOURCE_EXHAUSTED:
                self.context.set_trailing_metadata(((RETRY_AFTER_KEY, str(RETRY_AFTER_MS)),))
            await self.context.abort(self.code, exc.message)
        request_id = current_request_id() or uuid.uuid4().hex[:12]
        log.exception("unhandled error in %s (request id %s)", self.method, request_id, exc_info=exc)
        self.code = grpc.StatusCode.INTERNAL
        await self.context.abort(self.code, f"internal error (request id {request_id}); the server log has the details")

    def finish(self) -> None:
        code = self.code.name
        note(code=code)
        self.runtime.metrics.requests.labels(self.method, code, "grpc").inc()
        self.runtime.metrics.request_seconds.labels(self.method, code, "grpc").observe(time.perf_counter() - self.started)

    async def __aenter__(self) -> _Call:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """The call's body ended: a failure becomes its status (`fail`), and the call is counted however it
        ended. An abort already carries its status; a closed stream (GeneratorExit) must not await."""
        try:
            if exc is not None and not isinstance(exc, PASS_THROUGH):
                await self.fail(exc)
        finally:
            self.finish()


def _check(item: Any, method: str) -> Any:
    if isinstance(item, Malformed):
        raise InvalidArgument(f"the {method} request is not a valid protobuf message ({item.reason})")
    return item


async def _checked_stream(items: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for item in items:
        yield _check(item, method)


def checked(request: Any, method: str) -> Any:
    """Malformed messages (see api/malformed.py) become INVALID_ARGUMENT, in unary and client-streaming calls."""
    return _checked_stream(request, method) if hasattr(request, "__aiter__") else _check(request, method)


def unary(fn: Callable[[Any, Any, grpc.aio.ServicerContext, Principal], Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        async with _Call(self, fn.__name__, context) as call:
            principal = call.principal()
            return await fn(self, checked(request, call.method), context, principal)

    return wrapper


def server_stream(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext, Principal], AsyncIterator[T]],
) -> Callable[..., AsyncIterator[T]]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        async with _Call(self, fn.__name__, context) as call:
            principal = call.principal()
            async for item in fn(self, checked(request, call.method), context, principal):
                yield item

    return wrapper


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline on our monotonic clock, so queued work can be dropped once it passes."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
