"""The asyncio client: the same methods and results as Client, on a grpc.aio channel."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc

from adaptgate_client import _requests as rq
from adaptgate_client import retry
from adaptgate_client.client import _DEFAULT, DEFAULT_TIMEOUT, Stubs, auth_metadata
from adaptgate_client.retry import RetryPolicy
from adaptgate_client.tls import ClientTls, channel_setup
from adaptgate_client.types import (
    Adapter, Classifications, Dataset, DeletedAdapters, Embeddings, Encoding, Job, JobEvent, Pooling,
)
from adaptgate_client.v1 import adapters_pb2, datasets_pb2, finetune_pb2

T = TypeVar("T")


class AsyncClient:
    """`async with AsyncClient("host:50051", token) as client: await client.embed([...])`. Create it inside the
    running event loop (grpc.aio channels belong to one loop). Options as for Client."""

    def __init__(
        self, target: str, token: str = "", *, timeout: float | None = DEFAULT_TIMEOUT, tls: ClientTls | None = None,
        credentials: grpc.ChannelCredentials | None = None, options: list[tuple[str, Any]] | None = None,
        retry_policy: RetryPolicy = RetryPolicy(),
    ) -> None:
        credentials, merged = channel_setup(tls, credentials, options)
        self.channel = (grpc.aio.insecure_channel(target, options=merged) if credentials is None
                        else grpc.aio.secure_channel(target, credentials, options=merged))
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.retry_policy = retry_policy
        self.stubs = Stubs(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()

    async def _unary(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        return await retry.acall(self.retry_policy, timeout,
                                 lambda left: method(request, metadata=self.metadata, timeout=left))

    async def _upload(self, method: Callable[..., Awaitable[T]], chunks: Callable[[], Iterator[Any]],
                      timeout: float | None) -> T:
        timeout = self.timeout if timeout is _DEFAULT else timeout
        return await retry.acall(self.retry_policy, timeout,
                                 lambda left: method(chunks(), metadata=self.metadata, timeout=left))

    # Embeddings

    async def embed(
        self, texts: Sequence[str], *, adapter: str = "", pooling: Pooling = Pooling.UNSPECIFIED,
        normalize: bool | None = None, truncate: bool = False, encoding: Encoding = Encoding.BYTES_F32,
        prompt_name: str | None = None, timeout: float | None = _DEFAULT,
    ) -> Embeddings:
        request = rq.embed(texts, adapter, pooling, normalize, truncate, encoding, prompt_name)
        return Embeddings.from_proto(await self._unary(self.stubs.embeddings.Embed, request, timeout))

    async def embed_stream(
        self, chunks: Iterable[Sequence[str]], *, adapter: str = "", pooling: Pooling = Pooling.UNSPECIFIED,
        normalize: bool | None = None, truncate: bool = False, encoding: Encoding = Encoding.BYTES_F32,
        prompt_name: str | None = None, timeout: float | None = None,
    ) -> AsyncIterator[Embeddings]:
        """One result per chunk, in order, over one EmbedStream call (see Client.embed_stream)."""
        template = rq.embed([], adapter, pooling, normalize, truncate, encoding, prompt_name)
        call = self.stubs.embeddings.EmbedStream(rq.embed_chunks(chunks, template), metadata=self.metadata,
                                                 timeout=timeout)
        async for response in call:
            yield Embeddings.from_proto(response)

    # Classifier

    async def classify(
        self, texts: Sequence[str], adapter: str = "", *, adapters: Sequence[str] = (), top_k: int = 0,
        truncate: bool = False, abstain_below: float | None = None, abstain_label: str = "", timeout: float | None = _DEFAULT,
    ) -> Classifications:
        request = rq.classify(texts, adapter, adapters, top_k, truncate, abstain_below, abstain_label)
        return Classifications.from_proto(await self._unary(self.stubs.classifier.Classify, request, timeout))

    # Adapters

    async def list_adapters(self, tenant: str = "", *, timeout: float | None = _DEFAULT) -> list[Adapter]:
        request = adapters_pb2.ListAdaptersRequest(tenant=tenant)
        return [Adapter.from_proto(a) for a in (await self._unary(self.stubs.adapters.ListAdapters, request, timeout)).adapters]

    async def get_adapter(self, ref: str, *, timeout: float | None = _DEFAULT) -> Adapter:
        request = adapters_pb2.AdapterRef(ref=ref)
        return Adapter.from_proto(await self._unary(self.stubs.adapters.GetAdapter, request, timeout))

    async def load_adapter(self, ref: str, *, pin: bool = False, timeout: float | None = _DEFAULT) -> Adapter:
        request = adapters_pb2.LoadAdapterRequest(ref=ref, pin=pin)
        return Adapter.from_proto(await self._unary(self.stubs.adapters.LoadAdapter, request, timeout))

    async def unload_adapter(self, ref: str, *, timeout: float | None = _DEFAULT) -> Adapter:
        request = adapters_pb2.AdapterRef(ref=ref)
        return Adapter.from_proto(await self._unary(self.stubs.adapters.UnloadAdapter, request, timeout))

    async def set_alias(self, ref: str, alias: str, *, timeout: float | None = _DEFAULT) -> Adapter:
        request = adapters_pb2.SetAliasRequest(ref=ref, alias=alias)
        return Adapter.from_proto(await self._unary(self.stubs.adapters.SetAlias, request, timeout))

    async def upload_adapter(
        self, directory: Path | str, name: str, *, alias: str = "", timeout: float | None = _DEFAULT
    ) -> Adapter:
        response = await self._upload(self.stubs.adapters.UploadAdapter,
                                      lambda: rq.adapter_chunks(Path(directory), name, alias), timeout)
        return Adapter.from_proto(response)

    async def delete_adapter(self, ref: str, *, force: bool = False, timeout: float | None = _DEFAULT) -> DeletedAdapters:
        request = adapters_pb2.AdapterRef(ref=ref, force=force)
        return DeletedAdapters.from_proto(await self._unary(self.stubs.adapters.DeleteAdapter, request, timeout))

    # Datasets

    async def upload_dataset(
        self, path: Path | str, *, name: str = "", format: str = "", text_field: str = "",  # noqa: A002
        label_field: str = "", timeout: float | None = _DEFAULT,
    ) -> Dataset:
        response = await self._upload(
            self.stubs.datasets.UploadDataset, lambda: rq.dataset_chunks(Path(path), name, format, text_field, label_field),
            timeout)
        return Dataset.from_proto(response)

    async def get_dataset(self, dataset_id: str, *, timeout: float | None = _DEFAULT) -> Dataset:
        request = datasets_pb2.DatasetRef(id=dataset_id)
        return Dataset.from_proto(await self._unary(self.stubs.datasets.GetDataset, request, timeout))

    async def list_datasets(self, *, timeout: float | None = _DEFAULT) -> list[Dataset]:
        response = await self._unary(self.stubs.datasets.ListDatasets, datasets_pb2.ListDatasetsRequest(), timeout)
        return [Dataset.from_proto(d) for d in response.datasets]

    async def delete_dataset(self, dataset_id: str, *, timeout: float | None = _DEFAULT) -> Dataset:
        request = datasets_pb2.DatasetRef(id=dataset_id)
        return Dataset.from_proto(await self._unary(self.stubs.datasets.DeleteDataset, request, timeout))

    # Finetune

    async def submit_job(
        self, dataset_id: str, adapter_name: str, *, method: str = "", alias: str = "", validation_fraction: float = 0.0,
        epochs: int = 0, learning_rate: float = 0.0, seed: int = 0, lora_rank: int = 0, batch_size: int = 0,
        max_tokens: int = 0, max_steps: int = 0, max_seconds: int = 0, validation_dataset_id: str = "",
        out_of_scope_label: str = "", timeout: float | None = _DEFAULT,
    ) -> Job:
        request = rq.submit_job(
            dataset_id, adapter_name, method=method, alias=alias, validation_fraction=validation_fraction, epochs=epochs,
            learning_rate=learning_rate, seed=seed, lora_rank=lora_rank, batch_size=batch_size, max_tokens=max_tokens,
            max_steps=max_steps, max_seconds=max_seconds, validation_dataset_id=validation_dataset_id,
            out_of_scope_label=out_of_scope_label)
        return Job.from_proto(await self._unary(self.stubs.finetune.SubmitJob, request, timeout))

    async def get_job(self, job_id: str, *, timeout: float | None = _DEFAULT) -> Job:
        return Job.from_proto(await self._unary(self.stubs.finetune.GetJob, finetune_pb2.JobRef(id=job_id), timeout))

    async def list_jobs(self, *, timeout: float | None = _DEFAULT) -> list[Job]:
        response = await self._unary(self.stubs.finetune.ListJobs, finetune_pb2.ListJobsRequest(), timeout)
        return [Job.from_proto(j) for j in response.jobs]

    async def cancel_job(self, job_id: str, *, timeout: float | None = _DEFAULT) -> Job:
        return Job.from_proto(await self._unary(self.stubs.finetune.CancelJob, finetune_pb2.JobRef(id=job_id), timeout))

    async def watch_job(self, job_id: str, *, timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """As Client.watch_job: reopened when dropped, events already seen skipped by sequence number."""
        last_seq = 0

        def open_watch(left: float | None) -> AsyncIterator[finetune_pb2.JobEvent]:
            return self.stubs.finetune.WatchJob(finetune_pb2.JobRef(id=job_id), metadata=self.metadata, timeout=left)

        async for event in retry.astream(self.retry_policy, timeout, open_watch, resumable=True):
            if event.seq > last_seq:
                last_seq = event.seq
                yield JobEvent.from_proto(event)
