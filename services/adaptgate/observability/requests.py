"""One request's observation: its id, what the serving code notes about it, its span and access line.

The protocol layers open it (`RequestObserver.request`), which puts it in a context variable for the
request's task (and the tasks it starts, which copy the context): log records read its id, the
serving code adds the tenant and the status, admission the texts and adapters, and the batcher its
timings (engine.batcher.SUBMIT_TIMINGS). When it closes, `finish` writes the access line and the
spans of the phases that ran on the engine thread, from the timestamps the batcher took there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from adaptgate.engine.batcher import SUBMIT_TIMINGS, SubmitTiming
from adaptgate.observability import stages as request_stages
from adaptgate.observability.stages import StageSink, StageTimes

REQUEST_ID_KEY = "x-request-id"  # the gRPC metadata key and the HTTP header, taken in and echoed back
# A client's id is kept when it is a plain token (no spaces or control characters a log line could be forged with).
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=@-]{0,127}")
# gRPC codes that are the server's fault: the span is marked an error (OpenTelemetry's RPC conventions).
_SERVER_FAULTS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}

GRPC_CODES = {
    name: number for number, name in enumerate((
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
        "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
        "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
    ))
}

access_log = logging.getLogger("adaptgate.access")


@dataclass
class ObservedRequest:
    request_id: str
    protocol: str  # "grpc" | "http"
    method: str  # Embed, Classify, ... as the metrics label it; the path until the HTTP route says
    span: Span
    tracer: Tracer
    api: bool = True  # an API call: an INFO access line and a span; probes and docs: a DEBUG line, no span
    started: float = field(default_factory=time.perf_counter)
    tenant: str = ""
    adapters: list[str] = field(default_factory=list)
    texts: int = 0
    code: str = ""  # the gRPC status name, on both protocols
    http_status: int | None = None
    responded_ns: int | None = None  # when the response left our code (gRPC: the handler returned)
    timings: list[SubmitTiming] = field(default_factory=list)
    stages: StageTimes = field(default_factory=StageTimes)
    stage_sink: StageSink | None = None

    def admitting(self, tenant: str, rows: int, adapters: list[str]) -> None:
        """Admission's arguments: an Embed costs a row per text, a Classify one per text and adapter
        (api.admission), so rows over adapters is the texts on either; stream chunks add up."""
        self.tenant = self.tenant or tenant
        self.texts += rows // max(1, len(adapters))
        self.adapters += [a for a in adapters if a not in self.adapters]

    @contextmanager
    def phase(self, name: str) -> Iterator[Span]:
        """A child span around work done in the request's own task (admission)."""
        with self.tracer.start_as_current_span(name, context=trace.set_span_in_context(self.span)) as span:
            yield span


_current: ContextVar[ObservedRequest | None] = ContextVar("adaptgate_request", default=None)


def current() -> ObservedRequest | None:
    return _current.get()


def current_request_id() -> str | None:
    request = _current.get()
    return None if request is None else request.request_id


def note(*, tenant: str | None = None, method: str | None = None, code: str | None = None) -> None:
    """What the shared RPC and HTTP code knows and the protocol layer does not; outside a request, nothing."""
    request = _current.get()
    if request is None:
        return
    if tenant is not None:
        request.tenant = tenant
    if method is not None:
        request.method = method
    if code is not None:
        request.code = code


def request_id_of(given: str | None) -> str:
    """The client's id when it is a plain token, else a new one: 128 random bits as 32 hex digits, as
    uuid4().hex reads, from the random module (seeded from the OS once) rather than a system call per
    request. An id needs to be unique, not unguessable."""
    if given and _CLIENT_ID.fullmatch(given):
        return given
    return f"{random.getrandbits(128):032x}"


class RequestObserver:
    """Opens and closes each request's observation; built once by the composition root with its tracer."""

    def __init__(self, tracer: Tracer | None = None, stage_sink: StageSink | None = None) -> None:
        """`stage_sink` takes each gRPC API request's time per stage when it ends (Metrics.request_stages.observe)."""
        self.tracer = tracer if tracer is not None else trace.get_tracer("adaptgate")
        self.stage_sink = stage_sink

    @contextmanager
    def request(
        self, protocol: str, method: str, span_name: str, carrier: Mapping[str, str],
        attributes: Mapping[str, str | int] | None = None, api: bool = True,
    ) -> Iterator[ObservedRequest]:
        """The request's span continues the caller's trace (W3C traceparent in `carrier`, lowercase keys)."""
        if api:
            span = self.tracer.start_span(
                span_name, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=dict(attributes or {})
            )
        else:
            span = trace.INVALID_SPAN
        times, stages_token = request_stages.begin()
        observed = ObservedRequest(
            request_id_of(carrier.get(REQUEST_ID_KEY)), protocol, method, span, self.tracer, api, stages=times,
            stage_sink=self.stage_sink if api and protocol == "grpc" else None,  # HTTP's stages cross awaits
        )
        request_token, timings_token = _current.set(observed), SUBMIT_TIMINGS.set(observed.timings)
        try:
            with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
                yield observed
        except BaseException as exc:
            observed.code = observed.code or ("CANCELLED" if isinstance(exc, GeneratorExit | asyncio.CancelledError) else "UNKNOWN")
            raise
        finally:
            try:
                finish(observed)
            finally:
                _reset(request_token, timings_token)
                request_stages.end(stages_token)


def _reset(request_token: object, timings_token: object) -> None:
    """A stream's generator may be closed from another context; the request ends with its task anyway."""
    try:
        _current.reset(request_token)  # type: ignore[arg-type]
        SUBMIT_TIMINGS.reset(timings_token)  # type: ignore[arg-type]
    except ValueError:
        pass


def finish(request: ObservedRequest) -> None:
    """The spans (engine phases from the batcher's timestamps, then the request's own), then the access
    line: once it is written, the request's trace is complete."""
    ended_ns = time.time_ns()
    request.code = request.code or "OK"
    duration_ms = (time.perf_counter() - request.started) * 1000
    if request.span.is_recording():
        _engine_spans(request, ended_ns)
        _end_request_span(request, ended_ns)
    _access_line(request, duration_ms)
    if request.stage_sink is not None:
        _report_stages(request)


def _report_stages(request: ObservedRequest) -> None:
    """The engine's stages from the batcher's timings, this function's own cost as `observe`, then every stage out."""
    stages = request.stages
    stages.mark("observe")
    for timing in request.timings:
        first = min((b.started_ns for b in timing.batches), default=timing.answered_ns)
        stages.add("queue_wait", (first - timing.queued_ns) / 1e9)
        stages.add("forward", timing.forward_ns / 1e9)
    sink, method = request.stage_sink, request.method
    assert sink is not None
    for stage, seconds in stages.seconds.items():
        sink(method, stage, seconds)


def _end_request_span(request: ObservedRequest, ended_ns: int) -> None:
    span = request.span
    span.set_attributes({
        "adaptgate.request_id": request.request_id, "adaptgate.tenant": request.tenant,
        "adaptgate.texts": request.texts, "adaptgate.adapters": request.adapters, "adaptgate.method": request.method,
        "adaptgate.code": request.code,
    })
    if request.protocol == "grpc":
        span.set_attribute("rpc.grpc.status_code", GRPC_CODES.get(request.code, GRPC_CODES["UNKNOWN"]))
        error = request.code in _SERVER_FAULTS
    else:
        span.set_attribute("http.response.status_code", request.http_status or 0)
        error = (request.http_status or 500) >= 500
    if error:
        span.set_status(Status(StatusCode.ERROR, request.code))
    span.end(end_time=ended_ns)


def _access_line(request: ObservedRequest, duration_ms: float) -> None:
    status = request.code if request.http_status is None else f"{request.http_status} {request.code}"
    adapters = ",".join(request.adapters) or "-"
    fields: dict[str, object] = {
        "method": request.method, "protocol": request.protocol, "tenant": request.tenant, "adapters": request.adapters,
        "code": request.code, "duration_ms": round(duration_ms, 3), "texts": request.texts, "request_id": request.request_id,
    }
    if request.http_status is not None:
        fields["http_status"] = request.http_status
    access_log.log(
        logging.INFO if request.api else logging.DEBUG,
        "%s %s %s %.1fms tenant=%s adapters=%s texts=%d request_id=%s",
        request.protocol, request.method, status, duration_ms, request.tenant or "-", adapters, request.texts,
        request.request_id, extra=fields,
    )


def _engine_spans(request: ObservedRequest, ended_ns: int) -> None:
    """queue (rows submitted until their first forward), forward (each batch that ran them: shared
    with other requests' rows, so its attributes say how many), response (answered until sent)."""
    parent = trace.set_span_in_context(request.span)
    tracer = request.tracer
    for timing in request.timings:
        first = min((b.started_ns for b in timing.batches), default=timing.answered_ns)
        queue = tracer.start_span("queue", context=parent, start_time=timing.queued_ns, attributes={"adaptgate.rows": timing.rows})
        queue.end(end_time=first)
        for batch in timing.batches:
            forward = tracer.start_span(
                "forward", context=parent, start_time=batch.started_ns,
                attributes={"adaptgate.batch.rows": batch.rows, "adaptgate.batch.tokens": batch.tokens},
            )
            forward.end(end_time=batch.ended_ns)
    if request.timings:
        answered = max(t.answered_ns for t in request.timings)
        response = tracer.start_span("response", context=parent, start_time=answered)
        response.end(end_time=max(answered, request.responded_ns or ended_ns))
