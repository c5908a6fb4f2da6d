"""A small synchronous Python client: stubs with the bearer token attached and uploads chunked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

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

CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ClientTls:
    """TLS towards the gateway: the CA that signed its certificate (None: the system's roots), the
    client certificate and key for mTLS (both or neither), and the name the server certificate is
    checked against when it differs from the host in the target (an IP, a port-forward, a tunnel)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            given, missing = ("cert", "key") if self.key_file is None else ("key", "cert")
            raise ValueError(
                f"a client TLS {given} was given without its {missing} (--tls-{missing}, ADAPTGATE_TLS_{missing.upper()}); "
                "mTLS needs both, plain TLS neither"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return Path(path).read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


class Client:
    def __init__(
        self, target: str, token: str, timeout: float | None = 120.0, credentials: grpc.ChannelCredentials | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """Plaintext unless `tls` (or ready-made `credentials`) is given."""
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 64 << 20)]
        if tls is not None:
            if credentials is not None:
                raise ValueError("give the Client either tls or credentials, not both")
            credentials = tls.credentials()
            options += tls.options()
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.timeout = timeout
        self.embeddings = embeddings_pb2_grpc.EmbeddingsStub(self.channel)
        self.classifier = classifier_pb2_grpc.ClassifierStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.datasets = datasets_pb2_grpc.DatasetsStub(self.channel)
        self.finetune = finetune_pb2_grpc.FinetuneStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def embed(self, texts: list[str], adapter: str = "", truncate: bool = False) -> embeddings_pb2.EmbedResponse:
        request = embeddings_pb2.EmbedRequest(texts=texts, adapter=adapter, truncate=truncate)
        return self.embeddings.Embed(request, metadata=self.metadata, timeout=self.timeout)

    def embed_array(self, texts: list[str], adapter: str = "", truncate: bool = False) -> np.ndarray:
        """[len(texts), dim] float32, sent as packed bytes: no per-float protobuf work on either side."""
        request = embeddings_pb2.EmbedRequest(
            texts=texts, adapter=adapter, truncate=truncate, encoding=embeddings_pb2.ENCODING_BYTES_F32
        )
        response = self.embeddings.Embed(request, metadata=self.metadata, timeout=self.timeout)
        return np.stack([np.frombuffer(e.packed, dtype="<f4") for e in response.embeddings])

    def embed_stream(self, chunks: Iterator[list[str]], adapter: str = "", truncate: bool = False) -> Iterator[np.ndarray]:
        """One [len(chunk), dim] array per chunk, in order, over one EmbedStream call (for large jobs)."""
        requests = (
            embeddings_pb2.EmbedRequest(texts=c, adapter=adapter, truncate=truncate, encoding=embeddings_pb2.ENCODING_BYTES_F32)
            for c in chunks
        )
        for response in self.embeddings.EmbedStream(requests, metadata=self.metadata):
            yield np.stack([np.frombuffer(e.packed, dtype="<f4") for e in response.embeddings])

    def classify(self, texts: list[str], adapter: str, top_k: int = 0, truncate: bool = False) -> classifier_pb2.ClassifyResponse:
        request = classifier_pb2.ClassifyRequest(texts=texts, adapter=adapter, top_k=top_k, truncate=truncate)
        return self.classifier.Classify(request, metadata=self.metadata, timeout=self.timeout)

    def upload_dataset(self, path: Path, name: str = "", fmt: str = "") -> datasets_pb2.Dataset:
        fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
        data = path.read_bytes()

        def chunks() -> Iterator[datasets_pb2.UploadDatasetChunk]:
            yield datasets_pb2.UploadDatasetChunk(name=name or path.stem, format=fmt, data=data[:CHUNK_BYTES])
            for start in range(CHUNK_BYTES, len(data), CHUNK_BYTES):
                yield datasets_pb2.UploadDatasetChunk(data=data[start : start + CHUNK_BYTES])

        return self.datasets.UploadDataset(chunks(), metadata=self.metadata, timeout=self.timeout)

    def upload_adapter(self, directory: Path, name: str, alias: str = "") -> adapters_pb2.Adapter:
        """Sends the files PEFT's save_pretrained wrote (plus labels.json); README.md and the like stay home."""
        keep = ("adapter_config.json", "adapter_model.safetensors", "labels.json", "adaptgate.json")
        files = [p for p in sorted(directory.iterdir()) if p.name in keep or p.suffix in (".bin", ".pt")]

        def chunks() -> Iterator[adapters_pb2.UploadAdapterChunk]:
            yield adapters_pb2.UploadAdapterChunk(name=name, alias=alias)
            for path in files:
                data = path.read_bytes()
                for start in range(0, max(len(data), 1), CHUNK_BYTES):
                    yield adapters_pb2.UploadAdapterChunk(filename=path.name, data=data[start : start + CHUNK_BYTES])

        return self.adapters.UploadAdapter(chunks(), metadata=self.metadata, timeout=self.timeout)

    def delete_adapter(self, ref: str, force: bool = False) -> adapters_pb2.DeleteAdapterResponse:
        """`name@v3` deletes one version, `name` every version; `force` also removes aliases pointing at them."""
        request = adapters_pb2.AdapterRef(ref=ref, force=force)
        return self.adapters.DeleteAdapter(request, metadata=self.metadata, timeout=self.timeout)

    def delete_dataset(self, dataset_id: str) -> datasets_pb2.Dataset:
        """Refused (FAILED_PRECONDITION) while a queued or running job trains on it."""
        return self.datasets.DeleteDataset(datasets_pb2.DatasetRef(id=dataset_id), metadata=self.metadata, timeout=self.timeout)

    def submit_job(
        self, dataset_id: str, adapter_name: str, method: str = "head", alias: str = "", max_seconds: int = 0
    ) -> finetune_pb2.Job:
        """`max_seconds`: the job's wall-clock limit (0 = the server's `max_job_seconds`)."""
        request = finetune_pb2.SubmitJobRequest(
            dataset_id=dataset_id, adapter_name=adapter_name, method=method, alias=alias, max_seconds=max_seconds
        )
        return self.finetune.SubmitJob(request, metadata=self.metadata, timeout=self.timeout)

    def watch_job(self, job_id: str) -> Iterator[finetune_pb2.JobEvent]:
        return self.finetune.WatchJob(finetune_pb2.JobRef(id=job_id), metadata=self.metadata)
