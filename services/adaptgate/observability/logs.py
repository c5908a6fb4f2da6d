"""Log records as text (a terminal) or as JSON lines (a log collector), each with its request id.

The JSON formatter is the stdlib's `logging.Formatter` with a dozen lines of `json.dumps`: the
fields are ours to name, `extra={...}` fields are kept as top-level keys (the access line's), and no
dependency is added for it.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Literal, TextIO

from opentelemetry import trace

from adaptgate.observability.requests import current

LogFormat = Literal["auto", "text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: the rest came from `extra=` and go into the JSON object as they are.
_CONTEXT = {"request_id", "trace_id", "span_id"}
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"} | _CONTEXT


class RequestContext(logging.Filter):
    """Stamps each record with the request served in this context and its trace (None outside both):
    the span current where the record was made, else the request's own (its access line is written
    after the request's span stopped being current)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = current()
        if getattr(record, "request_id", None) is None:
            record.request_id = None if request is None else request.request_id
        span = trace.get_current_span().get_span_context()
        if not span.is_valid and request is not None:
            span = request.span.get_span_context()
        if span.is_valid:
            record.trace_id, record.span_id = f"{span.trace_id:032x}", f"{span.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, request_id,
    trace_id/span_id inside a sampled span, `extra` fields, and the exception's traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k in sorted(_CONTEXT) if (v := getattr(record, k, None)) is not None)
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def writes_json(log_format: LogFormat, stream: TextIO) -> bool:
    """auto: a person reads a terminal, a collector reads everything else."""
    if log_format != "auto":
        return log_format == "json"
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def log_handler(log_format: LogFormat, stream: TextIO) -> logging.Handler:
    """A handler writing `stream` in the chosen format, every record stamped with its request id."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if writes_json(log_format, stream) else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestContext())
    return handler


def configure_logging(level: str, log_format: LogFormat = "auto", stream: TextIO | None = None) -> logging.Handler:
    """The root logger's one handler (replacing any), so every library's records come out alike."""
    handler = log_handler(log_format, stream if stream is not None else sys.stderr)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    return handler
