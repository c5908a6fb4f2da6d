"""adaptgate.v1.Adapters: the store and the serving cache, per tenant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from adaptgate.adapters.cache import AdapterCache, Resident
from adaptgate.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from adaptgate.adapters.refs import check_name
from adaptgate.adapters.store import AdapterRecord, AdapterStore
from adaptgate.adapters.validation import check_filenames
from adaptgate.api.auth import Principal
from adaptgate.api.rpc import RpcRuntime, unary
from adaptgate.errors import InvalidArgument, ResourceExhausted
from adaptgate.v1 import adapters_pb2 as pb
from adaptgate.v1 import adapters_pb2_grpc


def to_proto(record: AdapterRecord, resident: Resident | None) -> pb.Adapter:
    return pb.Adapter(
        ref=str(record.ref), version=record.version, tenant=record.tenant, name=record.name,
        aliases=record.aliases, labels=record.labels, rank=record.rank, target_modules=record.target_modules,
        loaded=resident is not None, pinned=bool(resident and resident.pinned), size_bytes=record.size_bytes,
        created_at=record.created_at, source=record.source,
    )


async def receive_files(chunks: AsyncIterator[pb.UploadAdapterChunk], max_bytes: int) -> tuple[str, str, dict[str, bytes]]:
    """Reassemble the streamed files; pickle or unknown file names are refused at their first chunk."""
    name, alias, total = "", "", 0
    files: dict[str, bytearray] = {}
    async for chunk in chunks:
        name, alias = name or chunk.name, alias or chunk.alias
        if chunk.filename:
            if chunk.filename not in files:
                check_filenames([chunk.filename, CONFIG_FILE, WEIGHTS_FILE])
            files.setdefault(chunk.filename, bytearray()).extend(chunk.data)
            total += len(chunk.data)
            if total > max_bytes:
                raise ResourceExhausted(f"the adapter upload is over the {max_bytes}-byte limit")
    if not name:
        raise InvalidArgument("the first UploadAdapter chunk must carry the adapter name")
    return name, alias, {k: bytes(v) for k, v in files.items()}


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime: RpcRuntime, store: AdapterStore, cache: AdapterCache, max_upload_bytes: int) -> None:
        self.runtime = runtime
        self.store = store
        self.cache = cache
        self.max_upload_bytes = max_upload_bytes

    async def _describe(self, record: AdapterRecord) -> pb.Adapter:
        return to_proto(record, self.cache.resident(record.ref))

    @unary
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.Adapter:
        if request.pin:
            principal.require_admin("pinning an adapter (it holds a shared engine slot)")
        resident = await self.cache.load(principal.adapter(request.ref), pin=request.pin)
        return await self._describe(await asyncio.to_thread(self.store.get, resident.record.ref))

    @unary
    async def UnloadAdapter(self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Adapter:
        ref = principal.adapter(request.ref)
        await self.cache.unload(ref)
        return await self._describe(await asyncio.to_thread(self.store.get, ref))

    @unary
    async def GetAdapter(self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Adapter:
        return await self._describe(await asyncio.to_thread(self.store.get, principal.adapter(request.ref)))

    @unary
    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.ListAdaptersResponse:
        tenant = request.tenant or principal.scope()
        if tenant is not None and tenant != principal.tenant:
            principal.require_admin("listing another tenant's adapters")
        records = await asyncio.to_thread(self.store.list, tenant and check_name(tenant, "tenant"))
        return pb.ListAdaptersResponse(adapters=[await self._describe(r) for r in records])

    @unary
    async def UploadAdapter(
        self, request: AsyncIterator[pb.UploadAdapterChunk], context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.Adapter:
        name, alias, files = await receive_files(request, self.max_upload_bytes)
        record = await asyncio.to_thread(self.store.publish, principal.tenant, name, files, alias, "upload")
        return await self._describe(record)

    @unary
    async def SetAlias(self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Adapter:
        ref = principal.adapter(request.ref)
        if not request.alias.strip():
            raise InvalidArgument("alias is empty")
        return await self._describe(await asyncio.to_thread(self.store.set_alias, ref, request.alias))
