"""The tracer provider: built by the composition root when an OTLP endpoint is configured.

Without one, requests still get spans from OpenTelemetry's global API (no-op unless something
else, an auto-instrumentation agent say, installed a provider), so tracing costs nothing when off.
"""

from __future__ import annotations

import os

from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from adaptgate import __version__


def otlp_tracer_provider(endpoint: str | None, replica: str = "") -> TracerProvider | None:
    """Spans batched to the collector at `endpoint` (OTLP/gRPC; http:// plaintext, https:// TLS);
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER apply as the SDK reads them."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # only when exporting

    attributes: dict[str, str] = {SERVICE_VERSION: __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = "adaptgate"
    if replica:
        attributes["service.instance.id"] = replica
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider
