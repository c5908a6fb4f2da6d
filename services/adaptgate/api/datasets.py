"""adaptgate.v1.Datasets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, unary
from adaptgate.errors import InvalidArgument, ResourceExhausted
from adaptgate.training.datasets import DatasetRecord, DatasetStore
from adaptgate.v1 import datasets_pb2 as pb
from adaptgate.v1 import datasets_pb2_grpc


def to_proto(record: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        id=record.id, name=record.name, tenant=record.tenant, rows=record.rows,
        labels=[pb.LabelCount(label=k, count=v) for k, v in sorted(record.label_counts.items())],
        warnings=record.warnings, created_at=record.created_at, size_bytes=record.size_bytes,
    )


class DatasetsServicer(datasets_pb2_grpc.DatasetsServicer):
    def __init__(self, runtime: RpcRuntime, datasets: DatasetStore, max_upload_bytes: int) -> None:
        self.runtime = runtime
        self.datasets = datasets
        self.max_upload_bytes = max_upload_bytes

    @unary
    async def UploadDataset(
        self, request: AsyncIterator[pb.UploadDatasetChunk], context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.Dataset:
        first: pb.UploadDatasetChunk | None = None
        data = bytearray()
        async for chunk in request:
            first = first or chunk
            data.extend(chunk.data)
            if len(data) > self.max_upload_bytes:
                raise ResourceExhausted(f"the dataset upload is over the {self.max_upload_bytes}-byte limit")
        if first is None or not first.name.strip():
            raise InvalidArgument("the first UploadDataset chunk must carry the dataset name and format")
        record = await asyncio.to_thread(
            self.datasets.create, principal.tenant, first.name.strip(), first.format.strip().lower() or "jsonl",
            bytes(data), first.text_field or "text", first.label_field or "label",
        )
        return to_proto(record)

    @unary
    async def GetDataset(self, request: pb.DatasetRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Dataset:
        return to_proto(await asyncio.to_thread(self.datasets.get, principal.scope(), request.id))

    @unary
    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.ListDatasetsResponse:
        records = await asyncio.to_thread(self.datasets.list, principal.scope())
        return pb.ListDatasetsResponse(datasets=[to_proto(r) for r in records])
