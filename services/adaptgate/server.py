"""The composition root: builds every part from Settings, serves gRPC + metrics, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
import time
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from adaptgate.adapters.cache import AdapterCache
from adaptgate.adapters.store import AdapterStore
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.api.adapters import AdaptersServicer
from adaptgate.api.auth import TokenAuthenticator, ensure_dev_tokens, load_tokens
from adaptgate.api.classifier import ClassifierServicer
from adaptgate.api.datasets import DatasetsServicer
from adaptgate.api.embeddings import EmbeddingsServicer
from adaptgate.api.finetune import FinetuneServicer
from adaptgate.api.http import HttpPlane, HttpServing, HttpTls, http_app
from adaptgate.api.malformed import MalformedRequestInterceptor
from adaptgate.api.roles import Plane, role_interceptor, serves, serves_service
from adaptgate.api.rpc import RpcRuntime
from adaptgate.api.uploads import SizeLimit, Uploads
from adaptgate.engine.batcher import BatchStats
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.model import BaseModel, load_base_model
from adaptgate.engine.rate import RowRate
from adaptgate.engine.thread import EngineThread
from adaptgate.inference import Inference
from adaptgate.metrics import Metrics
from adaptgate.observability.admission import ObservedAdmission
from adaptgate.observability.asgi import ObservedApp
from adaptgate.observability.grpc_server import ObservabilityInterceptor
from adaptgate.observability.logs import LogFormat
from adaptgate.observability.logs import configure_logging as configure_log_handler
from adaptgate.observability.requests import RequestObserver
from adaptgate.observability.tracing import otlp_tracer_provider
from adaptgate.quotas import StorageLimits, StorageQuotas
from adaptgate.settings import Settings
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.db.database import open_database
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.jobs.records import PublishRequest
from adaptgate.training.runners.ray_runner import RayRunner
from adaptgate.training.tracking import TrackingConfig
from adaptgate.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    classifier_pb2,
    classifier_pb2_grpc,
    datasets_pb2,
    datasets_pb2_grpc,
    embeddings_pb2,
    embeddings_pb2_grpc,
    finetune_pb2,
    finetune_pb2_grpc,
)

log = logging.getLogger("adaptgate.server")

SERVICE_NAMES = tuple(
    module.DESCRIPTOR.services_by_name[name].full_name
    for module, name in (
        (embeddings_pb2, "Embeddings"), (classifier_pb2, "Classifier"), (adapters_pb2, "Adapters"),
        (datasets_pb2, "Datasets"), (finetune_pb2, "Finetune"),
    )
)


@dataclass
class Gateway:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    engine: Engine
    jobs: JobManager | None  # None on an inference replica (api/roles.py)
    runner: RayRunner | None
    port: int
    metrics_port: int
    http: HttpServing | None = None
    draining: bool = False
    tracer_provider: trace.TracerProvider | None = None  # built here from otlp_endpoint: flushed on stop

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else 0

    async def stop(self, grace: float = 10.0) -> None:
        """Health goes NOT_SERVING first (/readyz 503), then in-flight calls get `grace` seconds to finish."""
        self.draining = True
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), self.http.stop(grace) if self.http is not None else asyncio.sleep(0))
        if self.jobs is not None:
            await self.jobs.close()
        await self.engine.stop()
        if self.runner is not None:
            await asyncio.to_thread(self.runner.stop)
        if (shutdown := getattr(self.tracer_provider, "shutdown", None)) is not None:
            await asyncio.to_thread(shutdown)  # the spans still batched go to the collector


def _tokens(settings: Settings) -> TokenAuthenticator:
    path = settings.tokens_file
    if path is None:
        path = settings.data_dir / "tokens.json"
        tenant_token, admin_token = ensure_dev_tokens(path)
        print(f"no token file given; development tokens in {path}:", flush=True)
        print(f"  tenant 'dev': {tenant_token}\n  admin:        {admin_token}", flush=True)
    return TokenAuthenticator(load_tokens(path))


def _engine(settings: Settings, base: BaseModel, metrics: Metrics, thread: EngineThread, rate: RowRate) -> Engine:
    config = EngineConfig(
        n_slots=settings.max_loaded_adapters, max_rank=settings.max_lora_rank, max_labels=settings.max_labels,
        max_batch_tokens=settings.max_batch_tokens, max_wait_s=settings.max_batch_wait_ms / 1000,
        max_batch_seconds=settings.max_batch_ms / 1000,
        max_queue_rows=settings.max_queue_texts, max_input_tokens=settings.max_input_tokens,
        cpu_kernels=settings.cpu_kernels == "auto", prepack_linears=settings.prepack_linears == "auto",
        merge_hot_adapter=settings.merge_hot_adapter == "auto",
    )
    def on_batch(stats: BatchStats) -> None:
        metrics.observe_batch(stats)
        rate.observe(stats)

    engine = Engine(base, config, on_batch, thread)
    metrics.track_queue(lambda: engine.queued_rows)
    metrics.track_merges(lambda: engine.merge_stats)
    metrics.engine_kernels(engine.kernel_paths)
    return engine


def _grpc_server(settings: Settings, runtime: RpcRuntime, observer: RequestObserver) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[  # the first wraps the others' handlers: role refusals are logged and traced too
            ObservabilityInterceptor(observer), MalformedRequestInterceptor(),
            role_interceptor(settings.role, settings.control_address, runtime),
        ],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
    )


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Plaintext only when no TLS file is configured at all; with a client CA, mTLS is required, not offered."""
    address = f"{settings.host}:{settings.port}"
    if missing := settings.tls_missing():  # Settings refuses these already; never plaintext for a partial setup
        raise ValueError(f"TLS is partly configured: {' and '.join(missing)} missing; refusing to serve plaintext")
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return server.add_insecure_port(address)
    pair = (settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())
    ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
    credentials = grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)
    return server.add_secure_port(address, credentials)


@dataclass
class ControlPlane:
    """What only a replica serving the control plane opens: the job database, datasets and jobs."""

    datasets: DatasetStore
    jobs: JobManager


async def _control_plane(
    settings: Settings, base: BaseModel, store: AdapterStore, quotas: StorageQuotas, runner: RayRunner, metrics: Metrics
) -> ControlPlane:
    database = open_database(settings.database_url, settings.database_path)
    datasets = DatasetStore(settings.datasets_dir, database, settings.max_labels, quotas, settings.max_label_conflict_fraction)

    def publish(request: PublishRequest) -> str:
        record = store.publish(request.tenant, request.adapter_name, request.files, request.alias, request.source)
        return str(record.ref)

    limits = JobLimits(
        settings.max_active_jobs_per_tenant, settings.max_active_jobs, settings.max_job_seconds, settings.max_lora_rank
    )
    jobs = JobManager(
        database, datasets, runner, publish, base.path, limits, base_fingerprint=base.spec.fingerprint,
        owner=settings.replica_name, lease_seconds=settings.job_lease_seconds,
        tracking=TrackingConfig(settings.mlflow_tracking_uri, settings.mlflow_experiment),
    )
    await jobs.start()
    metrics.track_jobs(jobs.counts_by_state)
    return ControlPlane(datasets, jobs)


def ray_runner(settings: Settings) -> RayRunner | None:
    """The job runner of a control-plane replica; an inference replica opens no job state (api/roles.py)."""
    if not serves(settings.role, Plane.CONTROL):
        return None
    return RayRunner(
        settings.ray_address, settings.ray_num_cpus, settings.training_cpus, checkpoint_root=settings.checkpoints_dir.uri,
        task_gpus=settings.training_gpus, task_resources=settings.training_resources,
    )


async def build(settings: Settings, tracer_provider: trace.TracerProvider | None = None) -> Gateway:
    """`tracer_provider`: where spans go; by default the OTLP exporter of settings.otlp_endpoint, if any."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    owned_provider = None if tracer_provider is not None else otlp_tracer_provider(settings.otlp_endpoint, settings.replica_name)
    provider = tracer_provider or owned_provider
    thread = EngineThread(settings.torch_threads, settings.gil_switch_interval_ms)  # before any other torch work (engine.thread)
    metrics = Metrics(max_adapter_labels=settings.metrics_max_adapter_labels)
    observer = RequestObserver(provider.get_tracer("adaptgate") if provider is not None else None, metrics.request_stages.observe)
    rate = RowRate()  # the engine measures it, admission reads it (deadline-aware refusals)
    runtime = RpcRuntime(_tokens(settings), metrics, ObservedAdmission.from_settings(settings, rate))
    runner = ray_runner(settings)
    load = functools.partial(load_base_model, settings.base_model, settings.dtype, settings.device)
    startup = [asyncio.get_running_loop().run_in_executor(thread.executor, load)]
    if runner is not None and runner.address is not None:  # a cluster: join now, so a wrong address fails the start
        startup.append(asyncio.to_thread(runner.start))
    base, *_ = await asyncio.gather(*startup)  # a local Ray starts with the first job (RayRunner.run)
    engine = _engine(settings, base, metrics, thread, rate)
    engine.start()
    validator = AdapterValidator(base.spec, settings.max_lora_rank, settings.max_labels)
    quotas = StorageQuotas(StorageLimits.from_settings(settings))  # adapters and datasets share each tenant's quota
    store = AdapterStore(settings.adapters_dir, validator, quotas)
    cache = AdapterCache(store, engine, settings.max_loaded_adapters, metrics, settings.adapter_host_cache_bytes)
    uploads = Uploads.from_settings(settings, metrics)
    control = await _control_plane(settings, base, store, quotas, runner, metrics) if runner is not None else None
    jobs = control.jobs if control is not None else None
    inference = Inference(engine, cache, settings.max_texts_per_request)

    server = _grpc_server(settings, runtime, observer)
    embeddings_pb2_grpc.add_EmbeddingsServicer_to_server(EmbeddingsServicer(runtime, inference, base.name), server)
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(runtime, inference), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(
        AdaptersServicer(runtime, store, cache, uploads, SizeLimit.adapters(settings)), server
    )
    if control is not None:  # elsewhere the role interceptor answers these methods
        datasets_pb2_grpc.add_DatasetsServicer_to_server(
            DatasetsServicer(runtime, control.datasets, uploads, SizeLimit.datasets(settings)), server
        )
        finetune_pb2_grpc.add_FinetuneServicer_to_server(FinetuneServicer(runtime, jobs), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.reflection:
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = _bind(server, settings)
    await server.start()
    for name in ("", *SERVICE_NAMES):
        served = not name or serves_service(settings.role, name)  # a role's refused services say so
        status = health_pb2.HealthCheckResponse.SERVING if served else health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set(name, status)
    metrics_port = 0
    if settings.metrics_port >= 0:
        http_server, _ = start_http_server(settings.metrics_port, addr=settings.host, registry=metrics.registry)
        metrics_port = http_server.server_port
    gateway = Gateway(server, health_servicer, engine, jobs, runner, port, metrics_port, tracer_provider=owned_provider)
    if settings.http_port >= 0:
        plane = HttpPlane(runtime, inference, store, base.name, base.spec.hidden_size, lambda: not gateway.draining)
        gateway.http = HttpServing(ObservedApp(http_app(plane), observer), HttpTls.from_settings(settings))  # type: ignore[arg-type]
        gateway.http.start(settings.host, settings.http_port)
    return gateway


async def serve(settings: Settings) -> None:
    started = time.perf_counter()
    gateway = await build(settings)
    host = "localhost" if settings.host in ("0.0.0.0", "[::]") else settings.host
    scheme = "https" if settings.tls_cert_file is not None else "http"
    if gateway.http is not None:
        print(f"adaptgate HTTP on {scheme}://{host}:{gateway.http_port} (OpenAI-compatible /v1/embeddings, /v1/models, /docs)", flush=True)
    print(
        f"adaptgate listening on {host}:{gateway.port} (gRPC) and "
        f"{f':{gateway.metrics_port}/metrics' if settings.metrics_port >= 0 else 'no /metrics (metrics port -1)'} "
        f"after {time.perf_counter() - started:.1f}s; model {gateway.engine.base.name} "
        f"in {gateway.engine.base.precision} on {gateway.engine.base.device}, {gateway.engine.kernels}; {gateway.engine.encoder}",
        flush=True,
    )
    tls = settings.tls_cert_file is not None
    ca_flag = " --tls-ca <ca.pem>" if tls else ""
    print(f"  try: adaptgate embed --server {host}:{gateway.port} --token <token>{ca_flag} 'hello world'", flush=True)
    print(f"       grpcurl {'-cacert <ca.pem>' if tls else '-plaintext'} {host}:{gateway.port} list", flush=True)
    if gateway.http is not None:
        print(
            f"       curl {'--cacert <ca.pem> ' if tls else ''}{scheme}://{host}:{gateway.http_port}/v1/embeddings -H 'Authorization: Bearer <token>' "
            f"-H 'Content-Type: application/json' -d '{{\"model\": \"{gateway.engine.base.name}\", \"input\": \"hello world\"}}'",
            flush=True,
        )
    if gateway.jobs is None:
        control = settings.control_address or "the control replica"
        print(f"  role {settings.role}: writes, datasets and jobs go to {control}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("adaptgate: draining (health NOT_SERVING, in-flight RPCs finish)", file=sys.stderr, flush=True)
    await gateway.stop(settings.drain_seconds)


def configure_logging(level: str, log_format: LogFormat = "auto") -> None:
    """Text on a terminal, JSON lines elsewhere (observability/logs.py); every line of a request carries its id."""
    configure_log_handler(level, log_format)
