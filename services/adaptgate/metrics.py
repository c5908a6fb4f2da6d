"""Prometheus metrics, all on one registry owned by the composition root (no process globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adaptgate.engine.batcher import BatchStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _JobsCollector(Collector):
    """Jobs by state, read from the job database at scrape time so it survives restarts."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("adaptgate_jobs", "Finetuning jobs by state.", labels=["state"])
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_adapter_labels: int = 100) -> None:
        self.registry = registry or CollectorRegistry()
        if registry is None:  # process_resident_memory_bytes and friends, as every Prometheus exporter has them
            ProcessCollector(registry=self.registry)
        self.max_adapter_labels = max_adapter_labels
        self._adapter_labels: set[str] = set()
        r = self.registry
        # `code` is the gRPC status name on both protocols (the HTTP API answers the same error kinds), so one
        # alert covers both; `protocol` is "grpc" or "http".
        self.requests = Counter(
            "adaptgate_requests", "Calls handled, by method, status code and protocol.", ["method", "code", "protocol"], registry=r
        )
        self.request_seconds = Histogram(
            "adaptgate_request_duration_seconds", "Call latency, by method, status code and protocol.", ["method", "code", "protocol"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.texts = Counter("adaptgate_texts", "Texts embedded or classified.", ["method"], registry=r)
        self.rejected = Counter("adaptgate_rejected", "Requests refused before compute, by reason.", ["reason"], registry=r)
        self.batch_rows = Histogram("adaptgate_batch_size", "Rows per forward pass.", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "adaptgate_batch_tokens", "Real (unpadded) tokens per forward pass.",
            buckets=tuple(b * 64 for b in SIZE_BUCKETS), registry=r,
        )
        self.padding_ratio = Histogram(
            "adaptgate_batch_padding_ratio", "Share of a batch's token slots that are padding.",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r,
        )
        self.batch_seconds = Histogram(
            "adaptgate_batch_duration_seconds",
            "Forward pass time per batch; its rate is the share of time the engine is busy (1.0 = saturated).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("adaptgate_queue_depth", "Texts waiting for a forward pass.", registry=r)
        self.adapters_loaded = Gauge("adaptgate_adapters_loaded", "Adapters resident in engine slots.", registry=r)
        self.adapter_cache = Counter(
            "adaptgate_adapter_cache_events", "Adapter cache hits, misses and evictions.", ["event"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            "adaptgate_adapter_load_seconds", "Time from a cache miss to a live adapter.", buckets=LATENCY_BUCKETS, registry=r
        )

        self.batch_adapters = Histogram(
            "adaptgate_batch_adapters", "Distinct adapters in one forward pass.", buckets=SIZE_BUCKETS, registry=r
        )
        self.adapter_requests = Counter(
            "adaptgate_adapter_requests",
            "Requests per adapter (tenant/name); adapters beyond the label budget count as 'other'.",
            ["adapter"], registry=r,
        )
        self.uploads_in_flight = Gauge(
            "adaptgate_uploads_in_flight", "Adapter and dataset uploads being streamed in now.", registry=r
        )
        self.upload_bytes_in_flight = Gauge(
            "adaptgate_upload_bytes_in_flight", "Bytes received by uploads that have not finished, on disk in the spool.",
            registry=r,
        )

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.tokens)
        self.batch_adapters.observe(stats.adapters)
        self.batch_seconds.observe(stats.seconds)
        self.padding_ratio.observe(1.0 - stats.tokens / stats.padded_tokens if stats.padded_tokens else 0.0)

    def count_adapter_request(self, adapter: str) -> None:
        """Bounded cardinality: the first `max_adapter_labels` adapters get their own series."""
        if adapter not in self._adapter_labels and len(self._adapter_labels) >= self.max_adapter_labels:
            adapter = "other"
        else:
            self._adapter_labels.add(adapter)
        self.adapter_requests.labels(adapter).inc()

    def track_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_JobsCollector(counts))

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)
