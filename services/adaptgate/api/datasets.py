"""adaptgate.v1.Datasets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, unary
from adaptgate.api.uploads import ChunkFormat, SizeLimit, Upload, Uploads
from adaptgate.errors import InvalidArgument
from adaptgate.quotas import Usage
from adaptgate.training.data.datasets import DatasetRecord, DatasetStore, check_name
from adaptgate.v1 import datasets_pb2 as pb
from adaptgate.v1 import datasets_pb2_grpc

UPLOAD_FILE = "upload"


def to_proto(record: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        id=record.id, name=record.name, tenant=record.tenant, rows=record.rows,
        labels=[pb.LabelCount(label=k, count=v) for k, v in sorted(record.label_counts.items())],
        warnings=record.warnings, created_at=record.created_at, size_bytes=record.size_bytes,
    )


def upload_header(first: pb.UploadDatasetChunk) -> str:
    """The dataset's name, checked before any byte is accepted."""
    name = first.name.strip()
    if not name:
        raise InvalidArgument("the first UploadDataset chunk must carry the dataset name and format")
    check_name(name)
    return name


async def write_chunk(upload: Upload, chunk: pb.UploadDatasetChunk) -> None:
    await upload.write(UPLOAD_FILE, chunk.data)


DATASET_CHUNKS = ChunkFormat(pb.UploadDatasetChunk, upload_header, write_chunk, Usage(datasets=1))


class DatasetsServicer(datasets_pb2_grpc.DatasetsServicer):
    def __init__(self, runtime: RpcRuntime, datasets: DatasetStore, uploads: Uploads, upload_limit: SizeLimit) -> None:
        self.runtime = runtime
        self.datasets = datasets
        self.uploads = uploads
        self.upload_limit = upload_limit

    @unary
    async def UploadDataset(
        self, request: AsyncIterator[pb.UploadDatasetChunk], context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.Dataset:
        """Streamed to a temporary file, then parsed row by row into the normalized JSONL."""
        tenant = principal.tenant
        async with self.uploads.receive_chunks(
            tenant, self.upload_limit, request, DATASET_CHUNKS, self.datasets.quotas
        ) as (upload, first, name):
            record = await asyncio.to_thread(
                self.datasets.create_from_file, tenant, name, first.format.strip().lower() or "jsonl",
                upload.path(UPLOAD_FILE), first.text_field or "text", first.label_field or "label",
            )
        return to_proto(record)

    @unary
    async def DeleteDataset(self, request: pb.DatasetRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Dataset:
        return to_proto(await asyncio.to_thread(self.datasets.delete, principal.scope(), request.id))

    @unary
    async def GetDataset(self, request: pb.DatasetRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Dataset:
        return to_proto(await asyncio.to_thread(self.datasets.get, principal.scope(), request.id))

    @unary
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.ListDatasetsResponse:
        records = await asyncio.to_thread(self.datasets.list, principal.scope())
        return pb.ListDatasetsResponse(datasets=[to_proto(r) for r in records])
