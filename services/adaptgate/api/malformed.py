"""Malformed protobuf becomes INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc fails a request whose bytes do not parse before any handler runs, with a status the client
cannot act on. This interceptor swaps each handler's deserializer for one that hands a `Malformed`
marker to the handler instead, and the RPC wrapper (`api/rpc.py`) turns it into a clear error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Malformed:
    reason: str


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf raises DecodeError and a few others
            return Malformed(str(exc) or type(exc).__name__)

    return parse


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=tolerant(handler.request_deserializer))  # type: ignore[attr-defined]
