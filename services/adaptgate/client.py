"""A small synchronous Python client: stubs with the bearer token attached and uploads chunked."""

from __future__ import annotations

from collections.abc import Iterator
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


class Client:
    def __init__(
        self, target: str, token: str, timeout: float | None = 120.0, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        options = [("grpc.max_receive_message_length", 64 << 20)]
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

    def submit_job(self, dataset_id: str, adapter_name: str, method: str = "head", alias: str = "") -> finetune_pb2.Job:
        request = finetune_pb2.SubmitJobRequest(dataset_id=dataset_id, adapter_name=adapter_name, method=method, alias=alias)
        return self.finetune.SubmitJob(request, metadata=self.metadata, timeout=self.timeout)

    def watch_job(self, job_id: str) -> Iterator[finetune_pb2.JobEvent]:
        return self.finetune.WatchJob(finetune_pb2.JobRef(id=job_id), metadata=self.metadata)
