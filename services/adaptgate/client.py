"""The gateway's own test and bench client: raw protobuf responses over the client package's stubs.

Applications use `adaptgate_client.Client` (typed results, retries, asyncio twin); this one stays for the code
that inspects the messages themselves, and shares the client package's TLS, channel set-up and uploads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from adaptgate_client import _requests as rq
from adaptgate_client.client import Stubs, auth_metadata
from adaptgate_client.tls import ClientTls, channel_setup
from adaptgate_client.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

__all__ = ["CHUNK_BYTES", "Client", "ClientTls"]
CHUNK_BYTES = rq.CHUNK_BYTES


class Client:
    def __init__(
        self, target: str, token: str, timeout: float | None = 120.0, credentials: grpc.ChannelCredentials | None = None,
        tls: ClientTls | None = None,
    ) -> None:
        """Plaintext unless `tls` (or ready-made `credentials`) is given."""
        credentials, options = channel_setup(tls, credentials, None)
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        stubs = Stubs(self.channel)
        self.embeddings = stubs.embeddings
        self.classifier = stubs.classifier
        self.adapters = stubs.adapters
        self.datasets = stubs.datasets
        self.finetune = stubs.finetune

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
        chunks = rq.dataset_chunks(Path(path), name, fmt, "", "")
        return self.datasets.UploadDataset(chunks, metadata=self.metadata, timeout=self.timeout)

    def upload_adapter(self, directory: Path, name: str, alias: str = "") -> adapters_pb2.Adapter:
        """Sends the files PEFT's save_pretrained wrote (plus labels.json); README.md and the like stay home."""
        chunks = rq.adapter_chunks(Path(directory), name, alias)
        return self.adapters.UploadAdapter(chunks, metadata=self.metadata, timeout=self.timeout)

    def delete_adapter(self, ref: str, force: bool = False) -> adapters_pb2.DeleteAdapterResponse:
        """`name@v3` deletes one version, `name` every version; `force` also removes aliases pointing at them."""
        request = adapters_pb2.AdapterRef(ref=ref, force=force)
        return self.adapters.DeleteAdapter(request, metadata=self.metadata, timeout=self.timeout)

    def delete_dataset(self, dataset_id: str) -> datasets_pb2.Dataset:
        """Refused (FAILED_PRECONDITION) while a queued or running job trains on it."""
        return self.datasets.DeleteDataset(datasets_pb2.DatasetRef(id=dataset_id), metadata=self.metadata, timeout=self.timeout)

    def submit_job(
        self, dataset_id: str, adapter_name: str, method: str = "", alias: str = "", max_seconds: int = 0
    ) -> finetune_pb2.Job:
        """`method` "" is the server's default (auto); `max_seconds`: the job's wall-clock limit (0 = the server's `max_job_seconds`)."""
        request = finetune_pb2.SubmitJobRequest(
            dataset_id=dataset_id, adapter_name=adapter_name, method=method, alias=alias, max_seconds=max_seconds
        )
        return self.finetune.SubmitJob(request, metadata=self.metadata, timeout=self.timeout)

    def watch_job(self, job_id: str) -> Iterator[finetune_pb2.JobEvent]:
        return self.finetune.WatchJob(finetune_pb2.JobRef(id=job_id), metadata=self.metadata)
