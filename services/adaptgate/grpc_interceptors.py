"""What the server's handler-rewriting interceptors share (api/malformed.py, observability/grpc_server.py).

grpc looks up each call's handler and hands it to the interceptors; these replace parts of that
handler (its deserializer, its behaviour) and leave a method grpc does not serve (no handler) alone.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

import grpc


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Calls `rewrite` with each call's handler and the method's path (`/package.Service/Method`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        return handler if handler is None else self.rewrite(handler, handler_call_details.method)

    @abc.abstractmethod
    def rewrite(self, handler: grpc.RpcMethodHandler, path: str) -> grpc.RpcMethodHandler:
        """The handler this call runs instead (or `handler` itself)."""
