"""Malformed protobuf becomes INVALID_ARGUMENT, not grpc's UNKNOWN.

grpc fails a request whose bytes do not parse before any handler runs, with a status the client
cannot act on. This interceptor swaps each handler's deserializer for one that hands a `Malformed`
marker to the handler instead, and the RPC wrapper (`api/rpc.py`) turns it into a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from adaptgate.grpc_interceptors import HandlerInterceptor


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


class MalformedRequestInterceptor(HandlerInterceptor):
    def rewrite(self, handler: grpc.RpcMethodHandler, path: str) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        return handler._replace(request_deserializer=tolerant(handler.request_deserializer))  # type: ignore[attr-defined]
