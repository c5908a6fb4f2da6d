"""Prometheus metrics, all on one registry owned by the composition root (no process globals)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from adaptgate.engine.batcher import BatchStats
from adaptgate.engine.lora.merged import MergeStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# A request's stages run from microseconds (auth, resolve) to a queue wait of a second.
STAGE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class StageHistogram(Collector):
    """adaptgate_request_stage_seconds{method,stage}: observed on every request, so it skips
    prometheus_client's per-observation lock and label lookup. Observations come from the event loop
    thread only; a scrape (another thread) reads a copy, and derives the count from its buckets so
    that the +Inf bucket and the count always agree."""

    NAME = "adaptgate_request_stage_seconds"

    def __init__(self, buckets: tuple[float, ...] = STAGE_BUCKETS) -> None:
        self.buckets = buckets
        self._series: dict[tuple[str, str], list[float]] = {}  # (method, stage) -> bucket counts, then the sum

    def observe(self, method: str, stage: str, seconds: float) -> None:
        series = self._series.get((method, stage))
        if series is None:
            series = self._series[(method, stage)] = [0.0] * (len(self.buckets) + 2)
        series[bisect_left(self.buckets, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            self.NAME, "Time per request in each stage of serving it (unary gRPC calls): on the event loop, waiting "
            "for queue_wait, and the request's share of each forward pass that ran its rows for forward.",
            labels=["method", "stage"],
        )
        for (method, stage), series in sorted(list(self._series.items())):
            counts, total = series[:-1], series[-1]
            cumulative, running = [], 0.0
            for bound, count in zip((*(str(b) for b in self.buckets), "+Inf"), counts):
                running += count
                cumulative.append((bound, running))
            family.add_metric([method, stage], cumulative, total)
        yield family


class _JobsCollector(Collector):
    """Jobs by state, read from the job database at scrape time so it survives restarts."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("adaptgate_jobs", "Finetuning jobs by state.", labels=["state"])
        for state, count in sorted(self._counts().items()):
            family.add_metric([state], count)
        yield family


class _MergeCollector(Collector):
    """The hot adapter merged into the base weights' copy, read from the engine at scrape time."""

    def __init__(self, stats: Callable[[], MergeStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        yield GaugeMetricFamily(
            "adaptgate_adapters_merged", "Adapters merged into a copy of the base weights (0 or 1): passes of only that "
            "adapter's rows run at base-model cost.", value=stats.merged,
        )
        yield CounterMetricFamily(
            "adaptgate_adapter_merges", "Adapters merged into the base weights' copy, each a pass over the targeted weights.",
            value=stats.merges,
        )
        yield CounterMetricFamily(
            "adaptgate_merged_batches", "Forward passes that ran on the merged adapter's weights, computing no LoRA delta.",
            value=stats.batches,
        )


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
        self.engine_kernel = Info(
            "adaptgate_engine_kernel",
            "Which implementation each engine operation runs (path: avx512_bf16 | onednn_prepacked | pytorch).",
            ["operation"], registry=r,
        )  # fmt: skip
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
        self.request_stages = StageHistogram()
        r.register(self.request_stages)
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

    def track_merges(self, stats: Callable[[], MergeStats]) -> None:
        self.registry.register(_MergeCollector(stats))

    def track_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def engine_kernels(self, paths: Mapping[str, str]) -> None:
        """One adaptgate_engine_kernel_info series per operation, its path as a label (the engine's startup choice)."""
        for operation, path in paths.items():
            self.engine_kernel.labels(operation).info({"path": path})
