"""The HTTP API: OpenAI-compatible `POST /v1/embeddings`, `GET /v1/models`, health probes.

A thin layer over the same data plane as the gRPC servicers: the same bearer tokens, the same
per-tenant admission before any tokenizing, the same batcher, and the same error kinds, answered
with the HTTP status in api/errors.py and the body OpenAI clients parse
(`{"error": {"message", "type", "param", "code"}}`). `model` is the base model's name, or an
adapter reference (`name`, `name:alias`, `name@v3`), as vLLM and LoRAX select adapters.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.api.auth import Principal
from adaptgate.api.errors import http_status_of
from adaptgate.api.rpc import RpcRuntime
from adaptgate.errors import AdaptgateError, ErrorCode, InvalidArgument
from adaptgate.inference import Inference

log = logging.getLogger("adaptgate.http")
RETRY_AFTER_S = "1"


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; token-id inputs are refused (this server tokenizes itself)."""

    input: str | list[str] = Field(description="A text or a list of texts.")
    model: str = Field(description="The base model's name, or an adapter reference (name, name:alias, name@vN).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Must equal the model's dimension when given.")
    user: str | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass
class HttpPlane:
    """What the HTTP API serves from: the RPC runtime (auth, admission, metrics) and the data plane."""

    runtime: RpcRuntime
    inference: Inference
    store: AdapterStore
    model_name: str
    dimension: int
    ready: Callable[[], bool]


# ----- errors: one body for every kind ---------------------------------------------------------------


def error_response(exc: AdaptgateError) -> JSONResponse:
    headers = {"retry-after": RETRY_AFTER_S} if exc.code is ErrorCode.RESOURCE_EXHAUSTED else None
    body = {"error": {"message": exc.message, "type": exc.code.value.lower(), "param": None, "code": exc.code.value}}
    return JSONResponse(body, status_code=http_status_of(exc), headers=headers)


async def _adaptgate_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AdaptgateError)
    return error_response(exc)


async def _invalid_request(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return error_response(InvalidArgument(f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}"))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex[:12]
    log.error("unhandled error (request id %s)", request_id, exc_info=exc)
    error = AdaptgateError(f"internal error (request id {request_id}); the server log has the details")
    return error_response(error)


# ----- the app ----------------------------------------------------------------------------------------


def http_app(plane: HttpPlane) -> FastAPI:
    app = FastAPI(title="adaptgate", summary="Embeddings and adapters over HTTP (OpenAI-compatible).", version="1")
    app.add_exception_handler(AdaptgateError, _adaptgate_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _unexpected)
    routes = Routes(plane)
    app.post("/v1/embeddings", response_model=EmbeddingsResponse)(routes.embeddings)
    app.get("/v1/models", response_model=ModelList)(routes.models)
    app.get("/healthz")(routes.healthz)
    app.get("/readyz")(routes.readyz)
    return app


class Routes:
    def __init__(self, plane: HttpPlane) -> None:
        self.plane = plane

    def _principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        return self.plane.runtime.auth.authenticate((("authorization", header),) if header is not None else ())

    async def _counted(self, method: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Metrics as the gRPC calls count them (the status code's gRPC name), labelled protocol="http"."""
        started, code = time.perf_counter(), "OK"
        try:
            return await call()
        except AdaptgateError as exc:
            code = exc.code.value
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            metrics = self.plane.runtime.metrics
            metrics.requests.labels(method, code, "http").inc()
            metrics.request_seconds.labels(method, code, "http").observe(time.perf_counter() - started)

    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
        """OpenAI's embeddings endpoint; vectors are L2-normalized, as OpenAI's are."""
        return await self._counted("Embed", lambda: self._embed(body, request))

    async def _embed(self, body: EmbeddingsRequest, request: Request) -> EmbeddingsResponse:
        principal = self._principal(request)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if body.dimensions is not None and body.dimensions != self.plane.dimension:
            raise InvalidArgument(
                f"dimensions {body.dimensions} is not available: {self.plane.model_name} gives {self.plane.dimension}-dimensional embeddings"
            )
        ref = self._adapter(principal, body.model)
        admission = self.plane.runtime.admission
        async with admission.admitted(principal.tenant, len(texts), (ref,) if ref else ()):
            out = await self.plane.inference.embed(texts, ref, None, True, False, None, principal.tenant)
        self.plane.runtime.metrics.texts.labels("Embed").inc(len(out.vectors))
        encode = ENCODINGS[body.encoding_format]
        data = [EmbeddingData(index=i, embedding=encode(v)) for i, v in enumerate(out.vectors)]
        tokens = int(sum(out.tokens))
        return EmbeddingsResponse(data=data, model=body.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    def _adapter(self, principal: Principal, model: str) -> AdapterRef | None:
        if model in ("", self.plane.model_name):
            return None
        return principal.adapter(model)

    async def models(self, request: Request) -> ModelList:
        """The base model, then the caller's adapter versions and aliases (each usable as `model`)."""
        return await self._counted("ListModels", lambda: self._models(request))

    async def _models(self, request: Request) -> ModelList:
        principal = self._principal(request)
        cards = [ModelCard(id=self.plane.model_name, created=0, owned_by="adaptgate")]
        for record in self.plane.store.list(principal.tenant):
            created = int(record.created_at)
            cards.append(ModelCard(id=f"{record.name}@v{record.version}", created=created, owned_by=record.tenant))
            cards += [ModelCard(id=f"{record.name}:{alias}", created=created, owned_by=record.tenant) for alias in record.aliases]
        return ModelList(data=cards)

    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        ready = self.plane.ready()
        return JSONResponse({"status": "ready" if ready else "draining"}, status_code=200 if ready else 503)


def _floats(vector: np.ndarray) -> list[float]:
    return [float(x) for x in vector]


def _base64(vector: np.ndarray) -> str:
    """What OpenAI clients decode: the little-endian float32 bytes, base64."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


ENCODINGS: dict[str, Callable[[np.ndarray], list[float] | str]] = {"float": _floats, "base64": _base64}


# ----- serving it beside the gRPC server -----------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the gateway's event loop: the gateway owns SIGTERM (it drains both APIs)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@dataclass(frozen=True)
class HttpTls:
    """The gRPC server's certificate serves HTTPS too, and its client CA requires client certificates:
    with TLS configured, no API is ever served in plaintext."""

    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> HttpTls:
        def text(path: object) -> str | None:
            return None if path is None else str(path)

        return cls(text(settings.tls_cert_file), text(settings.tls_key_file), text(settings.tls_client_ca_file))

    def config(self) -> dict[str, Any]:
        if self.cert_file is None:
            return {}
        options: dict[str, Any] = {"ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        if self.client_ca_file is not None:
            options.update(ssl_ca_certs=self.client_ca_file, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options


class HttpServing:
    """The HTTP API on its own port, on the gateway's event loop."""

    def __init__(self, app: FastAPI, tls: HttpTls = HttpTls()) -> None:
        self.app = app
        self.tls = tls
        self.port = 0
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, host: str, port: int) -> int:
        """Binds and listens before returning, so the port printed accepts connections at once."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", **self.tls.config())
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="adaptgate http")
        self.port = int(sock.getsockname()[1])
        return self.port

    async def stop(self, grace: float) -> None:
        """Stops accepting, then gives open requests `grace` seconds."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._server.force_exit = True
            await self._task
