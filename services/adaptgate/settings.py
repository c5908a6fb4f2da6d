"""One typed settings object: every field is an `ADAPTGATE_*` env var and a `--flag` of `adaptgate serve`."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adaptgate.storage import Storage

# What a replica serves (adaptgate.api.roles has the method registry): all = one machine,
# inference = the scaled stateless replicas, control = the one replica that owns jobs and writes.
Role = Literal["all", "inference", "control"]
TLS_FILES = ("tls_cert_file", "tls_key_file")


class Settings(BaseSettings):
    """Server settings; defaults run everything on one machine with the packaged model."""

    model_config = SettingsConfigDict(env_prefix="ADAPTGATE_", populate_by_name=True, extra="forbid")

    host: str = Field("0.0.0.0", description="Interface the gRPC server binds.")
    port: int = Field(50051, description="gRPC port.")
    http_port: int = Field(
        8080, description="HTTP API port: OpenAI-compatible /v1/embeddings, /v1/models, /healthz, /readyz (0 = any free port, -1 disables it)."
    )
    metrics_port: int = Field(9464, description="Prometheus /metrics port (0 = any free port, -1 disables it).")
    data_dir: Path = Field(Path("data"), description="Adapter store, datasets and the job database.")
    tokens_file: Path | None = Field(
        None, description="JSON token file; without one a dev token file is created in data_dir."
    )
    base_model: str | None = Field(
        None,
        description="Model directory, or a Hugging Face id (org/name) already in the local Hugging Face cache "
        "(HF_HUB_CACHE, else HF_HOME/hub; never downloaded); default: the packaged all-MiniLM-L6-v2.",
    )
    dtype: Literal["auto", "bfloat16", "float32", "int8"] = Field(
        "auto", description="auto = bf16 on GPUs and on CPUs with AMX/avx512_bf16, else fp32; int8 (CPU, opt-in) = int8 linears over auto."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the base model runs.")
    torch_threads: int = Field(0, description="Intra-op threads for the engine thread (0 = OMP_NUM_THREADS, else every core).")
    gil_switch_interval_ms: float = Field(
        0.5, ge=0.0,
        description="Longest time a Python thread keeps the GIL while another waits for it (0 = Python's 5 ms): the "
        "engine thread needs it back after every op while the event loop answers requests.",
    )
    max_batch_tokens: int = Field(2048, description="Tokens per forward pass: real ones where the encoder packs rows, padded ones otherwise.")
    max_batch_wait_ms: float = Field(2.0, description="How long a batch waits for company.")
    max_batch_ms: float = Field(
        150.0, ge=0.0,
        description="A batch holds at most about this much work at the engine's measured speed (never under 256 tokens; 0 = tokens alone): "
        "batches are not preempted, so this bounds how long a request arriving during a flood waits for the batch ahead of it.",
    )
    max_queue_texts: int = Field(
        4096, description="Texts admitted and unanswered, all tenants together, beyond which requests get RESOURCE_EXHAUSTED."
    )
    max_texts_per_request: int = Field(512, description="Texts in one Embed/Classify request.")
    max_input_tokens: int = Field(0, description="Token limit per text (0 = the model's own limit).")
    max_message_bytes: int = Field(16 * 1024 * 1024, description="Largest gRPC message accepted.")
    max_upload_bytes: int = Field(
        128 * 1024 * 1024,
        description="Largest dataset upload (streamed to disk, refused at the chunk past it); also the adapter limit when max_adapter_upload_bytes is 0.",
    )
    max_adapter_upload_bytes: int = Field(
        64 * 1024 * 1024, description="Largest adapter upload, all its files together (0 = max_upload_bytes)."
    )
    max_uploads_per_tenant: int = Field(4, description="Uploads (adapters and datasets) one tenant may stream at once (0 = no limit).")
    max_uploads: int = Field(16, description="Uploads the server streams at once, all tenants together (0 = no limit).")
    max_upload_bytes_in_flight_per_tenant: int = Field(
        256 * 1024 * 1024, description="Bytes one tenant's unfinished uploads may have received (0 = no limit)."
    )
    max_upload_bytes_in_flight: int = Field(
        1024 * 1024 * 1024, description="Bytes all unfinished uploads may have received, server-wide (0 = no limit)."
    )
    max_storage_bytes_per_tenant: int = Field(
        1024 * 1024 * 1024, description="Stored bytes per tenant, adapter versions and datasets together (0 = no limit)."
    )
    max_adapter_versions_per_tenant: int = Field(256, description="Adapter versions one tenant may store (0 = no limit).")
    max_datasets_per_tenant: int = Field(100, description="Datasets one tenant may store (0 = no limit).")
    max_label_conflict_fraction: float = Field(
        0.01, ge=0.0, le=1.0,
        description="Rows whose text another row gives a different label, as a fraction of a dataset: up to it the majority label is kept (ties dropped) with a warning; above it the upload is refused.",
    )
    max_storage_bytes: int = Field(0, description="Stored bytes of all tenants together (0 = no limit but the disk).")
    max_inflight_per_tenant: int = Field(64, description="Embed/Classify requests one tenant may have in flight (0 = no limit).")
    max_queued_texts_per_tenant: int = Field(
        1024,
        description="Texts one tenant may have admitted and unanswered (a Classify's count once per adapter); past it "
        "RESOURCE_EXHAUSTED, a request larger than it INVALID_ARGUMENT; checked before tokenizing (0 = max_queue_texts only).",
    )
    max_leased_adapters_per_tenant: int = Field(
        16,
        description="Distinct adapters one tenant's requests in flight may use at once, so one tenant cannot pin every "
        "adapter slot; checked before resolving any (0 = max_loaded_adapters only).",
    )
    refusal_rate_per_tenant: float = Field(
        20.0,
        description="RESOURCE_EXHAUSTED refusals per second one tenant gets at once (a burst of one second's worth); "
        "past it each is held until its turn, so retrying without backoff cannot spend the server's CPU (0 = never held).",
    )
    refusal_rate: float = Field(
        200.0, description="The same pacing for all tenants' refusals together (0 = never held)."
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection (turn off in production if you prefer).")
    drain_seconds: float = Field(10.0, description="On SIGTERM: how long in-flight RPCs get to finish.")
    max_loaded_adapters: int = Field(64, description="Adapter slots resident in the engine (LRU beyond).")
    adapter_host_cache_bytes: int = Field(
        512 * 1024 * 1024, description="Host-memory budget for validated adapter weights behind the slots (LRU)."
    )
    metrics_max_adapter_labels: int = Field(100, description="Adapters with their own metric series; the rest are 'other'.")
    cpu_kernels: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on CPU in bf16, LoRA deltas, packed attention and add+LayerNorm run the fused kernels built "
        "at install time, where this CPU has AVX512-BF16, and in fp32 LoRA deltas run the AVX2 kernel, where it has "
        "AVX2 and FMA; off: PyTorch ops.",
    )
    prepack_linears: Literal["auto", "off"] = Field(
        "auto",
        description="auto: on CPU in bf16, the encoder's linears run on oneDNN-prepacked weights, where this CPU runs "
        "oneDNN's bf16 matmuls natively (AVX512BW/VL/DQ or AVX-NE-CONVERT); off: plain F.linear.",
    )
    merge_hot_adapter: Literal["auto", "off"] = Field(
        "auto",
        description="auto: in fp32, the adapter that carries every row of several batches in a row is merged into one "
        "copy of the targeted linears' weights, and batches of that adapter alone run at base speed (other batches "
        "are unchanged); off: every batch computes its LoRA deltas.",
    )
    max_lora_rank: int = Field(16, description="Largest LoRA rank an adapter may have (slots are padded to it).")
    max_labels: int = Field(1024, description="Largest label count of a task head (heads are stored by size class, so small heads do not pay for it).")
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("ray_address", "ADAPTGATE_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster address, joined at start; empty: a local Ray, started by the first job.",
    )
    ray_num_cpus: int = Field(0, description="CPUs of the local Ray (0 = all).")
    training_cpus: float = Field(1.0, description="CPUs one training job reserves on Ray.")
    training_gpus: float = Field(0.0, description="GPUs one training job reserves on Ray (0 = CPU workers).")
    training_resources: dict[str, float] = Field(
        default_factory=dict,
        description='Ray custom resources one training job reserves on a cluster, as a JSON object: pins training to a '
        'worker group, e.g. {"adaptgate-training": 1} (empty = any worker; a local Ray, one node, ignores it).',
    )
    database_url: str = Field(
        "",
        description="Job database: empty = the SQLite file data_dir/adaptgate.db (one control replica); "
        "postgresql://user:password@host:5432/db = PostgreSQL, shared by any number of control replicas, each job owned through a lease.",
    )
    storage_uri: str = Field(
        "",
        description="Where datasets and training checkpoints live: a directory every control replica and Ray worker mounts, "
        "or a filesystem URI (file://..., or s3://..., gs://... when that fsspec driver is installed); empty = data_dir.",
    )
    job_lease_seconds: float = Field(
        30.0,
        description="How long a control replica owns a running job without renewing it (renewed every third of it); "
        "when its owner dies, another replica takes the job over after this and resumes it from its checkpoint.",
    )
    replica_id: str = Field("", description="This replica's name in job leases (empty = hostname-pid).")
    max_active_jobs_per_tenant: int = Field(4, description="Queued or running finetuning jobs one tenant may have (0 = no limit).")
    max_active_jobs: int = Field(32, description="Queued or running finetuning jobs of all tenants together (0 = no limit).")
    max_job_seconds: int = Field(
        6 * 3600,
        description="Wall-clock seconds a finetuning job may run, queueing on Ray included, before it fails and its Ray task is cancelled; SubmitJob's max_seconds may ask for less.",
    )
    mlflow_tracking_uri: str = Field(
        "",
        description="MLflow tracking server (e.g. http://mlflow:5000) every finetuning job logs a run to, from the Ray "
        "worker that trains it: parameters, evaluation metrics, per-block learning rates, confusion matrix, published adapter; "
        "empty = no tracking.",
    )
    mlflow_experiment: str = Field("adaptgate", description="MLflow experiment the jobs' runs go to (created when missing).")
    tls_cert_file: Path | None = Field(None, description="PEM server certificate; with tls_key_file, gRPC serves TLS only.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."
    )
    role: Role = Field(
        "all",
        description="all: every method; inference: Embed, Classify and adapter reads only (writes, datasets and jobs answer FAILED_PRECONDITION naming control_address; no job database, dataset store or Ray); control: every method, on the one replica that owns jobs.",
    )
    control_address: str = Field(
        "", description="host:port of the control replica, named in the answer an inference replica gives to writes and job calls."
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["auto", "text", "json"] = Field(
        "auto",
        description="auto: text when stderr is a terminal, JSON lines otherwise (containers, log collectors); "
        "text: one human line per record; json: one JSON object per line (timestamp, level, logger, message, request_id, trace_id).",
    )
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("otlp_endpoint", "ADAPTGATE_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="OpenTelemetry collector (OTLP over gRPC, e.g. http://otel-collector:4317; https:// for TLS): each "
        "request is traced with admission, queue, forward and response spans; empty = no tracing.",
    )

    @field_validator("training_resources", mode="before")
    @classmethod
    def _resources_from_json(cls, value: object) -> object:
        """A --training-resources flag arrives as its JSON text (the env var is parsed by pydantic-settings)."""
        return json.loads(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_is_all_or_nothing(self) -> Settings:
        """A partial TLS configuration refuses to start: serving plaintext instead would fail open."""
        if missing := self.tls_missing():
            given = [name for name in (*TLS_FILES, "tls_client_ca_file") if getattr(self, name) is not None]
            names = " and ".join(f"{name} (ADAPTGATE_{name.upper()}, --{name.replace('_', '-')})" for name in missing)
            raise ValueError(
                f"TLS is partly configured: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but {names} "
                f"{'is' if len(missing) == 1 else 'are'} missing; set {'it' if len(missing) == 1 else 'them'} to serve TLS, "
                "or unset every tls_* setting to serve plaintext"
            )
        return self

    def tls_missing(self) -> list[str]:
        """The TLS files still needed: none when TLS is fully configured or not configured at all."""
        if self.tls_cert_file is None and self.tls_key_file is None and self.tls_client_ca_file is None:
            return []
        return [name for name in TLS_FILES if getattr(self, name) is None]

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def datasets_dir(self) -> Storage:
        """Uploaded datasets, on shared storage: every control replica trains on them."""
        return Storage(self.storage_root).child("datasets")

    @property
    def storage_root(self) -> str:
        """Shared storage (storage.py): storage_uri, else data_dir (one machine, or a volume mounted at the same path)."""
        return self.storage_uri or str(self.data_dir)

    @property
    def checkpoints_dir(self) -> Storage:
        """Training checkpoints, one folder per unfinished job, on shared storage: every Ray worker reads and writes them."""
        return Storage(self.storage_root).child("checkpoints")

    @property
    def database_path(self) -> Path:
        """The embedded job database, used when database_url is empty."""
        return self.data_dir / "adaptgate.db"

    @property
    def replica_name(self) -> str:
        """This process in job leases: unique among replicas sharing a database, unless set to a pod's name."""
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"
