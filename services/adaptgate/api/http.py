"""The HTTP API: OpenAI-compatible `POST /v1/embeddings`, `GET /v1/models`, `POST /v1/classify`, health probes.

A thin layer over the same data plane as the gRPC servicers: the same bearer tokens, the same
per-tenant admission before any tokenizing, the same batcher, and the same error kinds, answered
with the HTTP status in api/errors.py and the body OpenAI clients parse
(`{"error": {"message", "type", "param", "code"}}`). `model` is the base model's name, or an
adapter reference (`name`, `name:alias`, `name@v3`), as vLLM and LoRAX select adapters.
`/v1/classify` is gRPC `Classify` in JSON: the same request fields, the same answer, the same code path.
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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterStore
from adaptgate.api.auth import Principal
from adaptgate.api.classifier import classify
from adaptgate.api.errors import http_status_of
from adaptgate.api.rpc import RpcRuntime
from adaptgate.errors import AdaptgateError, ErrorCode, InvalidArgument
from adaptgate.inference import Inference
from adaptgate.v1 import classifier_pb2
from adaptgate.observability.requests import current_request_id, note

log = logging.getLogger("adaptgate.http")
RETRY_AFTER_S = "1"


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request; token-id inputs are refused (this server tokenizes itself)."""

    input: str | list[str] = Field(description="A text or a list of texts.")
    model: str = Field(description="The base model's name, or an adapter reference (name, name:alias, name@vN).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Must equal the model's dimension when given.")
    user: str | None = None
    prompt_name: str | None = Field(
        None,
        description="A prompt of the model (e.g. E5's query or passage) put before each text; "
        'unset = its default prompt, "" = none. Not in OpenAI\'s API.',
    )


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


class ClassifyRequest(BaseModel):
    """gRPC's ClassifyRequest in JSON; unknown fields are refused, so a misspelt one is never silently ignored."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str]
    adapter: str = Field("", description="`tenant/name[@version|:alias]`, or `name` for the caller's own tenant.")
    adapters: list[str] = Field(default_factory=list, description="Several adapters instead of `adapter`: answers in `by_adapter`.")
    top_k: int = Field(0, ge=0, le=2**32 - 1, description="Label scores per text; 0 returns all of them.")
    truncate: bool = False
    abstain_below: float | None = Field(
        None, ge=0.0, le=1.0, description="Abstain when the top score is below this; unset: the adapter's own threshold, if any.")
    abstain_label: str = Field("", description='Label of an abstained answer; empty: the adapter\'s, else "out_of_scope".')


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    label: str
    score: float
    scores: list[LabelScore] = Field(description="Highest score first.")
    abstained: bool = Field(False, description="The top score was below the abstain threshold: `label` is the abstain label.")


class AdapterResults(BaseModel):
    adapter: str
    results: list[Classification]


class ClassifyResponse(BaseModel):
    """gRPC's ClassifyResponse: `results` and `adapter` answer `adapter`; `by_adapter` answers `adapters`."""

    results: list[Classification]
    adapter: str
    by_adapter: list[AdapterResults]


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
    request_id = current_request_id() or uuid.uuid4().hex[:12]
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
    app.post("/v1/classify", response_model=ClassifyResponse)(routes.classify)
    app.get("/healthz")(routes.healthz)
    app.get("/readyz")(routes.readyz)
    return app


class Routes:
    def __init__(self, plane: HttpPlane) -> None:
        self.plane = plane

    def _principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        principal = self.plane.runtime.auth.authenticate((("authorization", header),) if header is not None else ())
        note(tenant=principal.tenant)  # for the access line and the trace (observability)
        return principal

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
            note(method=method, code=code)
            metrics = self.plane.runtime.metrics
            metrics.requests.labels(method, code, "http").inc()
            metrics.request_seconds.labels(method, code, "http").observe(time.perf_counter() - started)

    async def embeddings(self, body: EmbeddingsRequest, request: Request) -> JSONResponse:
        """OpenAI's embeddings endpoint; vectors are L2-normalized, as OpenAI's are."""
        return await self._counted("Embed", lambda: self._embed(body, request))

    async def _embed(self, body: EmbeddingsRequest, request: Request) -> JSONResponse:
        principal = self._principal(request)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if body.dimensions is not None and body.dimensions != self.plane.dimension:
            raise InvalidArgument(
                f"dimensions {body.dimensions} is not available: {self.plane.model_name} gives {self.plane.dimension}-dimensional embeddings"
            )
        ref = self._adapter(principal, body.model)
        admission = self.plane.runtime.admission
        async with admission.admitted(principal.tenant, len(texts), (ref,) if ref else ()):
            out = await self.plane.inference.embed(
                texts, ref, None, True, False, None, principal.tenant, body.prompt_name
            )
        self.plane.runtime.metrics.texts.labels("Embed").inc(len(out.vectors))
        return embeddings_json(out.vectors, int(sum(out.tokens)), body.model, body.encoding_format)

    def _adapter(self, principal: Principal, model: str) -> AdapterRef | None:
        if model in ("", self.plane.model_name):
            return None
        return principal.adapter(model)

    async def classify(self, body: ClassifyRequest, request: Request) -> ClassifyResponse:
        """Texts to labels with the caller's task heads, through the gRPC Classify code path."""
        return await self._counted("Classify", lambda: self._classify(body, request))

    async def _classify(self, body: ClassifyRequest, request: Request) -> ClassifyResponse:
        principal = self._principal(request)
        message = classifier_pb2.ClassifyRequest(**body.model_dump(exclude_none=True))
        answer = await classify(self.plane.runtime, self.plane.inference, principal, message, None)
        return ClassifyResponse(
            results=_classifications(answer.results),
            adapter=answer.adapter,
            by_adapter=[AdapterResults(adapter=a.adapter, results=_classifications(a.results)) for a in answer.by_adapter],
        )

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


def _classifications(results: Iterable[classifier_pb2.Classification]) -> list[Classification]:
    return [
        Classification(label=r.label, score=r.score, scores=[LabelScore(label=s.label, score=s.score) for s in r.scores],
                       abstained=r.abstained)
        for r in results
    ]


class NumpyJSONResponse(JSONResponse):
    """JSON by orjson, which writes numpy float32 arrays itself: the stdlib encoder would turn every float
    into a Python object and format it on its own, a sizeable share of the forward pass that made them."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def embeddings_json(vectors: list[np.ndarray], tokens: int, model: str, encoding: str) -> JSONResponse:
    """EmbeddingsResponse's JSON, built as plain values, not through the pydantic model (which would
    validate and re-serialize every float)."""
    encode = ENCODINGS[encoding]
    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return NumpyJSONResponse(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


def _floats(vector: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vector, dtype=np.float32)  # written as a list of numbers by NumpyJSONResponse


def _base64(vector: np.ndarray) -> str:
    """What OpenAI clients decode: the little-endian float32 bytes, base64."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


ENCODINGS: dict[str, Callable[[np.ndarray], np.ndarray | str]] = {"float": _floats, "base64": _base64}


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
        config = uvicorn.Config(  # log_config None: uvicorn's records go through the gateway's handler (JSON or text)
            self.app, log_level="warning", log_config=None, access_log=False, lifespan="off", **self.tls.config()
        )
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
