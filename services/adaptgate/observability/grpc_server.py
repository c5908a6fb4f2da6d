"""gRPC: each adaptgate method's handler runs inside its request's observation.

An interceptor rather than the servicer wrappers (api/rpc.py) because only the real call context
can send the request id back as initial metadata, and only the method path names the span as
OpenTelemetry's RPC conventions do (`adaptgate.v1.Embeddings/Embed`). The wrappers still note the
tenant and the status code, which only they know.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

import grpc

from adaptgate.grpc_interceptors import HandlerInterceptor
from adaptgate.observability import stages
from adaptgate.observability.requests import REQUEST_ID_KEY, ObservedRequest, RequestObserver
from adaptgate.observability.stages import Timed

SERVED_PREFIX = "/adaptgate."  # health and reflection are not requests worth a line or a trace


class ObservabilityInterceptor(HandlerInterceptor):
    def __init__(self, observer: RequestObserver) -> None:
        self.observer = observer

    def rewrite(self, handler: grpc.RpcMethodHandler, path: str) -> grpc.RpcMethodHandler:
        if not path.startswith(SERVED_PREFIX):
            return handler
        service, _, method = path[1:].rpartition("/")
        if handler.unary_unary is not None:
            handler = self._timed_codec(handler, method)
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method))  # type: ignore[attr-defined]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, service, method, staged=False))  # type: ignore[attr-defined]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, service, method))  # type: ignore[attr-defined]
        return handler._replace(stream_stream=self._stream(handler.stream_stream, service, method))  # type: ignore[attr-defined]

    def _timed_codec(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """decode and encode of a unary call: the protobuf (de)serializers' time, reported as each runs
        (outside the handler's observation: decode comes before it, encode after)."""
        sink = self.observer.stage_sink
        if sink is None:
            return handler
        replaced = {}
        if handler.request_deserializer is not None:
            replaced["request_deserializer"] = Timed(handler.request_deserializer, method, "decode", sink)
        if handler.response_serializer is not None:
            replaced["response_serializer"] = Timed(handler.response_serializer, method, "encode", sink)
        return handler._replace(**replaced)  # type: ignore[attr-defined]

    def _open(self, context: grpc.aio.ServicerContext, service: str, method: str) -> AbstractContextManager[ObservedRequest]:
        carrier = {key.lower(): value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        return self.observer.request("grpc", method, f"{service}/{method}", carrier, attributes)

    def _unary(
        self, behavior: Callable[..., Awaitable[Any]], service: str, method: str, staged: bool = True
    ) -> Callable[..., Awaitable[Any]]:
        """`staged`: one request, one message (unary-unary), so its stages are the request's."""

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._open(context, service, method) as call:
                if not staged:
                    call.stage_sink = None
                stages.mark("observe")
                await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
                stages.lap()
                try:
                    return await behavior(request, context)
                finally:
                    _ended(call, context)

        return observed

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]], service: str, method: str) -> Callable[..., AsyncIterator[Any]]:
        async def observed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._open(context, service, method) as call:
                call.stage_sink = None  # a stream's chunks run concurrently: no one request's stages
                await context.send_initial_metadata(((REQUEST_ID_KEY, call.request_id),))
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    _ended(call, context)

        return observed


def _ended(call: ObservedRequest, context: grpc.aio.ServicerContext) -> None:
    """The handler is done: its response is built (its encoding ends here); the code, when the
    wrappers did not note one, is the context's."""
    call.responded_ns = time.time_ns()
    if not call.code:
        code = context.code()
        call.code = code.name if isinstance(code, grpc.StatusCode) else ""
