"""HTTP: every request through the app runs inside its request's observation.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: the route runs in the same task and context
(so what it notes reaches the access line), and the response streams through untouched but for the
`x-request-id` header added to its start.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from adaptgate.api.errors import HTTP_STATUS_BY_CODE
from adaptgate.observability.requests import REQUEST_ID_KEY, ObservedRequest, RequestObserver

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
TRACED_PREFIX = "/v1/"  # the API; probes and docs are logged at DEBUG and not traced
# The error kind of an HTTP status (one each): for answers the routes never saw, a malformed body say.
CODE_BY_HTTP_STATUS = {status: code.value for code, status in HTTP_STATUS_BY_CODE.items()}


class ObservedApp:
    def __init__(self, app: ASGIApp, observer: RequestObserver) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        carrier = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", ())}
        verb, path = scope.get("method", "GET"), scope.get("path", "")
        attributes = {"http.request.method": verb, "url.path": path, "url.scheme": scope.get("scheme", "http")}
        api = path.startswith(TRACED_PREFIX)
        with self.observer.request("http", path, f"{verb} {path}", carrier, attributes, api=api) as call:

            async def send_observed(message: Message) -> None:
                if message["type"] == "http.response.start":
                    call.responded_ns = time.time_ns()
                    call.http_status = int(message["status"])
                    headers = [*message.get("headers", ()), (REQUEST_ID_KEY.encode(), call.request_id.encode())]
                    message = {**message, "headers": headers}
                await send(message)

            try:
                await self.app(scope, receive, send_observed)
            except Exception:
                call.http_status = call.http_status or 500
                raise
            finally:
                _code_of_status(call)


def _code_of_status(call: ObservedRequest) -> None:
    """The routes note their code (api/http.py `_counted`); anything else answered is read off its status."""
    if not call.code and call.http_status is not None:
        call.code = "OK" if call.http_status < 400 else CODE_BY_HTTP_STATUS.get(call.http_status, "UNKNOWN")
