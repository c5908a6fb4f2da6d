"""The synchronous client: every RPC of the gateway as a method with typed results, bounded retries
that honour the server's back-off, one deadline per call across its retries."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TypeVar

import grpc

from adaptgate_client import _requests as rq
from adaptgate_client import retry
from adaptgate_client.retry import RetryPolicy
from adaptgate_client.tls import ClientTls, channel_setup
from adaptgate_client.types import (
    Adapter, Classifications, Dataset, DeletedAdapters, Embeddings, Encoding, Job, JobEvent, Pooling,
)
from adaptgate_client.v1 import (
    adapters_pb2, adapters_pb2_grpc, classifier_pb2_grpc, datasets_pb2, datasets_pb2_grpc, embeddings_pb2_grpc,
    finetune_pb2, finetune_pb2_grpc,
)

T = TypeVar("T")
DEFAULT_TIMEOUT = 120.0
_DEFAULT: Any = object()  # "the client's timeout", distinct from None ("no deadline")


class Stubs:
    """The raw gRPC stubs, for what the typed methods do not cover (custom metadata, call objects)."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        self.embeddings = embeddings_pb2_grpc.EmbeddingsStub(channel)
        self.classifier = classifier_pb2_grpc.ClassifierStub(channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(channel)
        self.datasets = datasets_pb2_grpc.DatasetsStub(channel)
        self.finetune = finetune_pb2_grpc.FinetuneStub(channel)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class Client:
    """`Client("host:50051", token)`: plaintext unless `tls` (or ready-made `credentials`) is given.

    `timeout` is each unary call's deadline, retries and waits included (None: no deadline); streaming calls
    (watch_job, embed_stream) have none unless given one. `options` go to the channel as they are
    (`grpc.keepalive_time_ms`, `grpc.max_receive_message_length`, ...)."""

    def __init__(
        self, target: str, token: str = "", *, timeout: float | None = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
        credentials: grpc.ChannelCredentials | None = None, options: list[tuple[str, Any]] | None = None,
        retry_policy: RetryPolicy = RetryPolicy(),
    ) -> None:
        credentials, merged = channel_setup(tls, credentials, options)
        self.channel = (grpc.insecure_channel(target, options=merged) if credentials is None
                        else grpc.secure_channel(target, credentials, options=merged))
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retry_policy = retry_policy
        self.stubs = Stubs(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        return retry.call(self.retry_policy, timeout, lambda left: method(request, metadata=self.metadata, timeout=left))

    def _upload(self, method: Callable[..., T], chunks: Callable[[], Iterator[Any]], timeout: float | None) -> T:
        """Each attempt sends the chunks afresh (the factory rereads the files)."""
        timeout = self.timeout if timeout is _DEFAULT else timeout
        return retry.call(self.retry_policy, timeout, lambda left: method(chunks(), metadata=self.metadata, timeout=left))

    # Embeddings

    def embed(
        self, texts: Sequence[str], *, adapter: str = "", pooling: Pooling = Pooling.UNSPECIFIED,
        normalize: bool | None = None, truncate: bool = False, encoding: Encoding = Encoding.BYTES_F32,
        prompt_name: str | None = None, timeout: float | None = _DEFAULT,
    ) -> Embeddings:
        request = rq.embed(texts, adapter, pooling, normalize, truncate, encoding, prompt_name)
        return Embeddings.from_proto(self._unary(self.stubs.embeddings.Embed, request, timeout))

    def embed_stream(
        self, chunks: Iterable[Sequence[str]], *, adapter: str = "", pooling: Pooling = Pooling.UNSPECIFIED,
        normalize: bool | None = None, truncate: bool = False, encoding: Encoding = Encoding.BYTES_F32,
        prompt_name: str | None = None, timeout: float | None = None,
    ) -> Iterator[Embeddings]:
        """One result per chunk, in order, over one EmbedStream call: the server keeps a few chunks in flight and
        pulls the next ones as it answers, so memory stays bounded for any number of chunks. Not retried (the
        chunks may be a one-pass iterator)."""
        template = rq.embed([], adapter, pooling, normalize, truncate, encoding, prompt_name)
        responses = self.stubs.embeddings.EmbedStream(rq.embed_chunks(chunks, template), metadata=self.metadata,
                                                      timeout=timeout)
        for response in responses:
            yield Embeddings.from_proto(response)

    # Classifier

    def classify(
        self, texts: Sequence[str], adapter: str = "", *, adapters: Sequence[str] = (), top_k: int = 0,
        truncate: bool = False, abstain_below: float | None = None, abstain_label: str = "", timeout: float | None = _DEFAULT,
    ) -> Classifications:
        """One `adapter` (results in `.results`), or several `adapters` on the same texts (`.by_adapter`)."""
        request = rq.classify(texts, adapter, adapters, top_k, truncate, abstain_below, abstain_label)
        return Classifications.from_proto(self._unary(self.stubs.classifier.Classify, request, timeout))

    # Adapters

    def list_adapters(self, tenant: str = "", *, timeout: float | None = _DEFAULT) -> list[Adapter]:
        response = self._unary(self.stubs.adapters.ListAdapters, adapters_pb2.ListAdaptersRequest(tenant=tenant), timeout)
        return [Adapter.from_proto(a) for a in response.adapters]

    def get_adapter(self, ref: str, *, timeout: float | None = _DEFAULT) -> Adapter:
        return Adapter.from_proto(self._unary(self.stubs.adapters.GetAdapter, adapters_pb2.AdapterRef(ref=ref), timeout))

    def load_adapter(self, ref: str, *, pin: bool = False, timeout: float | None = _DEFAULT) -> Adapter:
        request = adapters_pb2.LoadAdapterRequest(ref=ref, pin=pin)
        return Adapter.from_proto(self._unary(self.stubs.adapters.LoadAdapter, request, timeout))

    def unload_adapter(self, ref: str, *, timeout: float | None = _DEFAULT) -> Adapter:
        return Adapter.from_proto(self._unary(self.stubs.adapters.UnloadAdapter, adapters_pb2.AdapterRef(ref=ref), timeout))

    def set_alias(self, ref: str, alias: str, *, timeout: float | None = _DEFAULT) -> Adapter:
        request = adapters_pb2.SetAliasRequest(ref=ref, alias=alias)
        return Adapter.from_proto(self._unary(self.stubs.adapters.SetAlias, request, timeout))

    def upload_adapter(
        self, directory: Path | str, name: str, *, alias: str = "", timeout: float | None = _DEFAULT
    ) -> Adapter:
        """Sends the files PEFT's save_pretrained wrote (plus labels.json) in chunks."""
        response = self._upload(self.stubs.adapters.UploadAdapter, lambda: rq.adapter_chunks(Path(directory), name, alias),
                                timeout)
        return Adapter.from_proto(response)

    def delete_adapter(self, ref: str, *, force: bool = False, timeout: float | None = _DEFAULT) -> DeletedAdapters:
        """`name@v3` deletes one version, `name` every version; `force` also removes aliases pointing at them."""
        request = adapters_pb2.AdapterRef(ref=ref, force=force)
        return DeletedAdapters.from_proto(self._unary(self.stubs.adapters.DeleteAdapter, request, timeout))

    # Datasets

    def upload_dataset(
        self, path: Path | str, *, name: str = "", format: str = "", text_field: str = "",  # noqa: A002
        label_field: str = "", timeout: float | None = _DEFAULT,
    ) -> Dataset:
        """`format` defaults from the suffix (.csv, .parquet, else jsonl); `name` from the file name; the fields to
        "text" and "label" (server side)."""
        response = self._upload(
            self.stubs.datasets.UploadDataset, lambda: rq.dataset_chunks(Path(path), name, format, text_field, label_field),
            timeout)
        return Dataset.from_proto(response)

    def get_dataset(self, dataset_id: str, *, timeout: float | None = _DEFAULT) -> Dataset:
        return Dataset.from_proto(self._unary(self.stubs.datasets.GetDataset, datasets_pb2.DatasetRef(id=dataset_id), timeout))

    def list_datasets(self, *, timeout: float | None = _DEFAULT) -> list[Dataset]:
        response = self._unary(self.stubs.datasets.ListDatasets, datasets_pb2.ListDatasetsRequest(), timeout)
        return [Dataset.from_proto(d) for d in response.datasets]

    def delete_dataset(self, dataset_id: str, *, timeout: float | None = _DEFAULT) -> Dataset:
        """Refused (FAILED_PRECONDITION) while a queued or running job trains on it."""
        request = datasets_pb2.DatasetRef(id=dataset_id)
        return Dataset.from_proto(self._unary(self.stubs.datasets.DeleteDataset, request, timeout))

    # Finetune

    def submit_job(
        self, dataset_id: str, adapter_name: str, *, method: str = "", alias: str = "", validation_fraction: float = 0.0,
        epochs: int = 0, learning_rate: float = 0.0, seed: int = 0, lora_rank: int = 0, batch_size: int = 0,
        max_tokens: int = 0, max_steps: int = 0, max_seconds: int = 0, validation_dataset_id: str = "",
        out_of_scope_label: str = "", timeout: float | None = _DEFAULT,
    ) -> Job:
        """Zeros and "" mean the server's defaults (method "auto", validation 0.1, the method's hyperparameters,
        the server's max_job_seconds); `validation_dataset_id` validates on that dataset instead of a split."""
        request = rq.submit_job(
            dataset_id, adapter_name, method=method, alias=alias, validation_fraction=validation_fraction, epochs=epochs,
            learning_rate=learning_rate, seed=seed, lora_rank=lora_rank, batch_size=batch_size, max_tokens=max_tokens,
            max_steps=max_steps, max_seconds=max_seconds, validation_dataset_id=validation_dataset_id,
            out_of_scope_label=out_of_scope_label)
        return Job.from_proto(self._unary(self.stubs.finetune.SubmitJob, request, timeout))

    def get_job(self, job_id: str, *, timeout: float | None = _DEFAULT) -> Job:
        return Job.from_proto(self._unary(self.stubs.finetune.GetJob, finetune_pb2.JobRef(id=job_id), timeout))

    def list_jobs(self, *, timeout: float | None = _DEFAULT) -> list[Job]:
        response = self._unary(self.stubs.finetune.ListJobs, finetune_pb2.ListJobsRequest(), timeout)
        return [Job.from_proto(j) for j in response.jobs]

    def cancel_job(self, job_id: str, *, timeout: float | None = _DEFAULT) -> Job:
        return Job.from_proto(self._unary(self.stubs.finetune.CancelJob, finetune_pb2.JobRef(id=job_id), timeout))

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobEvent]:
        """The job's events from the first until a terminal state. A dropped stream is reopened (within the
        retry policy) and the events already seen are skipped by their sequence number."""
        last_seq = 0  # the server numbers a job's events from 1

        def open_watch(left: float | None) -> Iterator[finetune_pb2.JobEvent]:
            return self.stubs.finetune.WatchJob(finetune_pb2.JobRef(id=job_id), metadata=self.metadata, timeout=left)

        for event in retry.stream(self.retry_policy, timeout, open_watch, resumable=True):
            if event.seq > last_seq:
                last_seq = event.seq
                yield JobEvent.from_proto(event)
