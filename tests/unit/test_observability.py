"""Operations support against a real in-process gateway (gRPC and HTTP on loopback, the tiny model):
JSON log lines carry one request id per request, equal to the id echoed back; one access line per
call with its fields; a trace per request with admission, queue, forward and response children that
continues the caller's W3C trace; text logs on a terminal as before."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adaptgate.observability.logs import TEXT_FORMAT, configure_logging, log_handler
from adaptgate.server import Gateway, build
from adaptgate.settings import Settings
from adaptgate.v1 import adapters_pb2, adapters_pb2_grpc, embeddings_pb2, embeddings_pb2_grpc

TOKEN = "acme-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class AccessLines(logging.Handler):
    """Wakes the test when an access line is written: a client can get its answer (an HTTP body, a gRPC
    error status) a moment before the server's wrapper finishes the request, writes its spans and the line."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.written = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.written.set()

    async def wait_for(self, n: int) -> None:
        while self.count < n:
            self.written.clear()
            await asyncio.wait_for(self.written.wait(), 10)


@dataclass
class Served:
    gateway: Gateway
    spans: InMemorySpanExporter
    logs: io.StringIO
    data_dir: Path
    access_lines: AccessLines

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.http_port}"

    def log_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.logs.getvalue().splitlines()]

    async def access(self, n: int) -> list[dict]:
        """The first n access lines, once written (the requests' spans have ended by then)."""
        await self.access_lines.wait_for(n)
        return [line for line in self.log_lines() if line["logger"] == "adaptgate.access"]


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The server's JSON handler on the root logger, as `configure_logging(..., "json")` installs it."""
    stream = io.StringIO()
    handler, root = log_handler("json", stream), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest_asyncio.fixture(loop_scope="function")  # the test's loop: the server's tasks and the client's share it
async def served(tmp_path: Path, tiny_bert_dir: Path, json_logs: io.StringIO) -> AsyncIterator[Served]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {TOKEN: {"tenant": "acme"}}}))
    settings = Settings(
        role="inference", host="127.0.0.1", port=0, http_port=0, metrics_port=-1, data_dir=tmp_path / "data",
        tokens_file=tokens, base_model=str(tiny_bert_dir), device="cpu", dtype="float32", cpu_kernels="off",
        reflection=False, ray_address=None,
    )
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway = await build(settings, tracer_provider=provider)
    access, access_log = AccessLines(), logging.getLogger("adaptgate.access")
    access_log.addHandler(access)
    try:
        yield Served(gateway, exporter, json_logs, settings.data_dir, access)
    finally:
        access_log.removeHandler(access)
        await gateway.stop(0)


def request_tree(spans: tuple[ReadableSpan, ...], name: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one request span called `name` and its children."""
    [root] = [s for s in spans if s.name == name]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    return root, children


def assert_request_trace(root: ReadableSpan, children: list[ReadableSpan], texts: int) -> None:
    assert f"{root.context.trace_id:032x}" == TRACE_ID, "the caller's traceparent is continued"
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
    assert root.attributes["adaptgate.tenant"] == "acme" and root.attributes["adaptgate.texts"] == texts
    assert root.attributes["adaptgate.code"] == "OK" and tuple(root.attributes["adaptgate.adapters"]) == ()
    names = [s.name for s in sorted(children, key=lambda s: s.start_time)]
    assert names[0] == "admission" and names[1] == "queue" and names[-1] == "response", names
    assert "forward" in names
    queue = next(s for s in children if s.name == "queue")
    forward = next(s for s in children if s.name == "forward")
    response = next(s for s in children if s.name == "response")
    assert queue.end_time <= forward.start_time < forward.end_time <= response.start_time <= response.end_time
    assert root.start_time <= queue.start_time and response.end_time <= root.end_time
    assert forward.attributes["adaptgate.batch.rows"] >= texts


async def test_grpc_embed_is_traced_logged_and_echoes_its_request_id(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:
        call = embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(texts=["one text", "and another"]),
            metadata=(*AUTH, ("traceparent", TRACEPARENT), ("x-request-id", "client-chosen-1")), timeout=30,
        )
        response = await call
        echoed = dict(await call.initial_metadata())["x-request-id"]
    assert len(response.embeddings) == 2 and echoed == "client-chosen-1"
    [access] = await served.access(1)
    root, children = request_tree(served.spans.get_finished_spans(), "adaptgate.v1.Embeddings/Embed")
    assert_request_trace(root, children, texts=2)
    assert root.attributes["rpc.grpc.status_code"] == 0 and root.attributes["adaptgate.request_id"] == echoed
    assert {k: access[k] for k in ("method", "protocol", "tenant", "adapters", "code", "texts", "request_id", "level")} == {
        "method": "Embed", "protocol": "grpc", "tenant": "acme", "adapters": [], "code": "OK", "texts": 2,
        "request_id": echoed, "level": "INFO",
    }
    assert access["duration_ms"] > 0 and access["trace_id"] == TRACE_ID


async def test_http_embeddings_is_traced_logged_and_echoes_its_request_id(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as client:
        answer = await client.post(
            "/v1/embeddings", json={"model": "", "input": ["one", "two", "three"]},
            headers={"authorization": f"Bearer {TOKEN}", "traceparent": TRACEPARENT},
        )
    assert answer.status_code == 200, answer.text
    echoed = answer.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", echoed), "an id is made when the client sends none"
    [access] = await served.access(1)
    root, children = request_tree(served.spans.get_finished_spans(), "POST /v1/embeddings")
    assert_request_trace(root, children, texts=3)
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["adaptgate.request_id"] == echoed
    assert {k: access[k] for k in ("method", "protocol", "tenant", "code", "http_status", "texts", "request_id")} == {
        "method": "Embed", "protocol": "http", "tenant": "acme", "code": "OK", "http_status": 200, "texts": 3,
        "request_id": echoed,
    }


async def test_a_failed_call_names_its_adapter_and_status(served: Served) -> None:
    async with grpc.aio.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
                embeddings_pb2.EmbedRequest(texts=["x"], adapter="missing"), metadata=AUTH, timeout=30
            )
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    [access] = await served.access(1)
    assert (access["code"], access["adapters"], access["texts"]) == ("NOT_FOUND", ["acme/missing"], 1)
    [root] = [s for s in served.spans.get_finished_spans() if s.name == "adaptgate.v1.Embeddings/Embed"]
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert tuple(root.attributes["adaptgate.adapters"]) == ("acme/missing",)
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as client:
        missing = await client.post("/v1/embeddings", json={"model": "missing", "input": ["x", "y"]}, headers=headers)
        malformed = await client.post("/v1/embeddings", json={"inputs": "x"}, headers=headers)  # refused before the route
    assert (missing.status_code, malformed.status_code) == (404, 400)
    _, http_missing, http_malformed = await served.access(3)
    assert (http_missing["code"], http_missing["http_status"], http_missing["adapters"], http_missing["texts"]) == (
        "NOT_FOUND", 404, ["acme/missing"], 2
    )
    assert (http_malformed["code"], http_malformed["http_status"]) == ("INVALID_ARGUMENT", 400)
    assert http_malformed["request_id"] == malformed.headers["x-request-id"]


async def test_grpc_malformed_bytes_are_observed_invalid_argument_and_an_unknown_method_is_left_alone(served: Served) -> None:
    """Both handler-rewriting interceptors on the real server: the malformed request is observed (its request
    id echoed, its access line written) and answered INVALID_ARGUMENT; a method with no handler stays UNIMPLEMENTED."""
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    async with grpc.aio.insecure_channel(served.target) as channel:
        malformed = channel.unary_unary("/adaptgate.v1.Embeddings/Embed", **raw)(b"\xff\xff\xff", metadata=AUTH, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await malformed
        echoed = dict(await malformed.initial_metadata())["x-request-id"]
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await channel.unary_unary("/adaptgate.v1.Embeddings/Nope", **raw)(b"", metadata=AUTH, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in refused.value.details()
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    [access] = await served.access(1)
    assert (access["method"], access["code"], access["request_id"]) == ("Embed", "INVALID_ARGUMENT", echoed)


async def test_every_line_of_a_request_carries_its_id(served: Served) -> None:
    """An unreadable adapter record makes listing log a warning (in a worker thread, for gRPC) before the
    access line: both lines of each call carry that call's id, the id the client got back."""
    record = served.data_dir / "adapters" / "acme" / "broken" / "v1" / "record.json"
    record.parent.mkdir(parents=True)
    record.write_text("not json")
    async with grpc.aio.insecure_channel(served.target) as channel:
        call = adapters_pb2_grpc.AdaptersStub(channel).ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=AUTH, timeout=30)
        assert list((await call).adapters) == []
        grpc_id = dict(await call.initial_metadata())["x-request-id"]
    async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as client:
        answer = await client.get("/v1/models", headers={"authorization": f"Bearer {TOKEN}", "x-request-id": "mine-2"})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "mine-2"
    await served.access(2)
    by_id: dict[str, list[dict]] = {}
    for line in served.log_lines():
        by_id.setdefault(line.get("request_id"), []).append(line)
    for request_id, method in ((grpc_id, "ListAdapters"), ("mine-2", "ListModels")):
        warning, access = by_id[request_id]
        assert warning["level"] == "WARNING" and "cannot be read" in warning["message"] and "exception" in warning
        assert access["logger"] == "adaptgate.access" and access["method"] == method
    assert grpc_id != "mine-2"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what a collector at otlp_endpoint is sent."""

    def __init__(self) -> None:
        self.span_names: list[str] = []

    async def Export(self, request, context):  # noqa: N802 (the generated name)
        self.span_names += [s.name for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_the_collector_at_otlp_endpoint(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The composition root builds the OTLP exporter from the setting; stopping the gateway flushes it."""
    collector, receiver = Collector(), grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {TOKEN: {"tenant": "acme"}}}))
    settings = Settings(
        role="inference", host="127.0.0.1", port=0, http_port=-1, metrics_port=-1, data_dir=tmp_path / "data",
        tokens_file=tokens, base_model=str(tiny_bert_dir), device="cpu", dtype="float32", cpu_kernels="off",
        reflection=False, ray_address=None, otlp_endpoint=f"http://127.0.0.1:{port}",
    )
    gateway = await build(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            await embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(embeddings_pb2.EmbedRequest(texts=["x"]), metadata=AUTH, timeout=30)
    finally:
        await gateway.stop(0)
        await receiver.stop(0)
    assert sorted(collector.span_names) == sorted(["adaptgate.v1.Embeddings/Embed", "admission", "queue", "forward", "response"])


def test_a_client_id_that_could_forge_a_log_line_is_replaced() -> None:
    from adaptgate.observability.requests import request_id_of

    assert request_id_of("abc-123") == "abc-123"
    for forged in ("two words", "line\nbreak", "x" * 200, ""):
        assert re.fullmatch(r"[0-9a-f]{32}", request_id_of(forged))


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """configure_logging replaces the root logger's handlers: pytest's come back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_text_on_a_terminal_by_default_json_elsewhere(root_logger: logging.Logger) -> None:
    """auto: a terminal (a real pty) gets the text lines it always had; a pipe gets JSON lines."""
    assert Settings().log_format == "auto"
    controller, terminal_fd = os.openpty()
    with os.fdopen(terminal_fd, "w") as terminal:
        handler = configure_logging("INFO", stream=terminal)
        assert handler.formatter is not None and handler.formatter._fmt == TEXT_FORMAT
        logging.getLogger("adaptgate.test").info("hello %s", "there")
        terminal.flush()
        written = os.read(controller, 4096).decode()
    os.close(controller)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO adaptgate.test: hello there\r?\n", written), written
    piped = io.StringIO()
    configure_logging("INFO", stream=piped)
    logging.getLogger("adaptgate.test").info("hello %s", "there")
    line = json.loads(piped.getvalue())
    assert (line["level"], line["logger"], line["message"]) == ("INFO", "adaptgate.test", "hello there")
    assert "request_id" not in line and line["timestamp"].endswith("+00:00")


def test_the_otlp_endpoint_setting_honours_the_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTGATE_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert Settings().otlp_endpoint == "http://collector:4317"
    monkeypatch.setenv("ADAPTGATE_OTLP_ENDPOINT", "http://ours:4317")
    assert Settings().otlp_endpoint == "http://ours:4317", "the gateway's own variable wins"
