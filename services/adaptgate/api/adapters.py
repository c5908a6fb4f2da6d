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
from adaptgate.api.uploads import ChunkFormat, SizeLimit, Upload, Uploads
from adaptgate.errors import InvalidArgument
from adaptgate.quotas import Usage
from adaptgate.v1 import adapters_pb2 as pb
from adaptgate.v1 import adapters_pb2_grpc


def to_proto(record: AdapterRecord, resident: Resident | None) -> pb.Adapter:
    return pb.Adapter(
        ref=str(record.ref), version=record.version, tenant=record.tenant, name=record.name,
        aliases=record.aliases, labels=record.labels, rank=record.rank, target_modules=record.target_modules,
        loaded=resident is not None, pinned=bool(resident and resident.pinned), size_bytes=record.size_bytes,
        created_at=record.created_at, source=record.source,
    )


def upload_header(first: pb.UploadAdapterChunk) -> tuple[str, str]:
    """The adapter's name and alias, checked before any file byte is accepted."""
    if not first.name:
        raise InvalidArgument("the first UploadAdapter chunk must carry the adapter name")
    if first.alias:
        check_name(first.alias, "alias")
    return check_name(first.name, "adapter name"), first.alias


async def write_chunk(upload: Upload, chunk: pb.UploadAdapterChunk) -> None:
    """Pickle or unknown file names are refused at their first chunk, before a byte is written."""
    if not chunk.filename:
        return
    if chunk.filename not in upload.filenames():
        check_filenames([chunk.filename, CONFIG_FILE, WEIGHTS_FILE])
    await upload.write(chunk.filename, chunk.data)


ADAPTER_CHUNKS = ChunkFormat(pb.UploadAdapterChunk, upload_header, write_chunk, Usage(adapter_versions=1))


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(
        self, runtime: RpcRuntime, store: AdapterStore, cache: AdapterCache, uploads: Uploads, upload_limit: SizeLimit
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.cache = cache
        self.uploads = uploads
        self.upload_limit = upload_limit

    async def _describe(self, record: AdapterRecord) -> pb.Adapter:
        return to_proto(record, self.cache.resident(record.ref))

    @unary
    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.Adapter:
        if request.pin:
            principal.require_admin("pinning an adapter (it holds a shared engine slot)")
        pinned_by = principal.tenant if request.pin else None
        resident = await self.cache.load(principal.adapter(request.ref), pinned_by=pinned_by)
        return await self._describe(await asyncio.to_thread(self.store.get, resident.record.ref))

    @unary
    async def UnloadAdapter(self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Adapter:
        """Only an admin lifts an admin's pin; a tenant's unload of a pinned adapter is PERMISSION_DENIED."""
        ref = principal.adapter(request.ref)
        await self.cache.unload(ref, may_unpin=principal.admin)
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
        """Streamed to a temporary directory, then validated (header first) and moved into the store."""
        tenant = principal.tenant
        async with self.uploads.receive_chunks(
            tenant, self.upload_limit, request, ADAPTER_CHUNKS, self.store.quotas
        ) as (upload, _, (name, alias)):
            record = await asyncio.to_thread(self.store.publish_dir, tenant, name, upload.directory, alias, "upload")
        return await self._describe(record)

    @unary
    async def DeleteAdapter(
        self, request: pb.AdapterRef, context: grpc.aio.ServicerContext, principal: Principal
    ) -> pb.DeleteAdapterResponse:
        """The versions leave the cache (all or none; refused while a request holds one), then the disk;
        no request can load them in between."""
        ref = principal.adapter(request.ref)
        versions = await asyncio.to_thread(self.store.deletable, ref, request.force)
        async with self.cache.deleting(versions):
            deletion = await asyncio.to_thread(self.store.delete, ref, request.force, versions)
        return pb.DeleteAdapterResponse(deleted=[str(r) for r in deletion.refs], aliases_removed=deletion.aliases)

    @unary
    async def SetAlias(self, request: pb.SetAliasRequest, context: grpc.aio.ServicerContext, principal: Principal) -> pb.Adapter:
        ref = principal.adapter(request.ref)
        if not request.alias.strip():
            raise InvalidArgument("alias is empty")
        return await self._describe(await asyncio.to_thread(self.store.set_alias, ref, request.alias))
