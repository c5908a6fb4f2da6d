"""Client-streamed uploads: admitted per tenant and server-wide, spooled to disk, always cleaned up.

An upload's chunks go straight to a temporary directory under the data dir (one file per uploaded
file name), written off the event loop, so memory holds one chunk per upload whatever the upload's
size. The directory is removed when the upload ends, however it ends (published, refused,
cancelled). Admission bounds how many uploads run at once and how many of their bytes are on disk
at once, per tenant and for the whole server; an upload over a limit is refused at the chunk that
crosses it with RESOURCE_EXHAUSTED naming the limit and its setting.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from adaptgate.errors import InvalidArgument, UploadsBusy, UploadTooLarge
from adaptgate.metrics import Metrics
from adaptgate.quotas import StorageQuotas, Usage, describe_bytes
from adaptgate.settings import Settings

STALE_UPLOAD_S = 6 * 3600.0  # at start, spooled uploads untouched this long belong to a dead process


@dataclass(frozen=True)
class UploadLimits:
    """0 means no limit. Field names are the settings' names, which refusals quote."""

    max_uploads_per_tenant: int = 0
    max_uploads: int = 0
    max_upload_bytes_in_flight_per_tenant: int = 0
    max_upload_bytes_in_flight: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


class UploadAdmission:
    """Counts uploads and their received bytes per tenant; runs on the event loop only, so no lock."""

    def __init__(self, limits: UploadLimits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self._uploads: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()

    @contextmanager
    def admit(self, tenant: str) -> Iterator[UploadTicket]:
        self._check_count(tenant)
        self._uploads[tenant] += 1
        ticket = UploadTicket(self, tenant)
        self._publish()
        try:
            yield ticket
        finally:
            self._uploads[tenant] -= 1
            self._bytes[tenant] -= ticket.received
            self._publish()

    def _check_count(self, tenant: str) -> None:
        per_tenant, total = self.limits.max_uploads_per_tenant, self.limits.max_uploads
        if per_tenant and self._uploads[tenant] >= per_tenant:
            raise UploadsBusy(
                f"tenant {tenant!r} already has {per_tenant} uploads in progress (max_uploads_per_tenant); "
                "wait for one to finish, then retry"
            )
        if total and sum(self._uploads.values()) >= total:
            raise UploadsBusy(f"the server already has {total} uploads in progress (max_uploads); retry shortly")

    def receive(self, tenant: str, n: int) -> None:
        """Counts `n` more bytes of the tenant's uploads in flight, or refuses them (naming which limit)."""
        per_tenant = self.limits.max_upload_bytes_in_flight_per_tenant
        total = self.limits.max_upload_bytes_in_flight
        if per_tenant and self._bytes[tenant] + n > per_tenant:
            raise UploadsBusy(
                f"tenant {tenant!r} has {describe_bytes(self._bytes[tenant])} of uploads in flight and this chunk "
                f"would pass its limit of {describe_bytes(per_tenant)} (max_upload_bytes_in_flight_per_tenant); "
                "upload one file at a time, or retry when the other uploads finish"
            )
        if total and sum(self._bytes.values()) + n > total:
            raise UploadsBusy(
                f"the server has {describe_bytes(sum(self._bytes.values()))} of uploads in flight and this chunk "
                f"would pass its limit of {describe_bytes(total)} (max_upload_bytes_in_flight); retry shortly"
            )
        self._bytes[tenant] += n
        self._publish()

    def in_flight(self, tenant: str | None = None) -> tuple[int, int]:
        """(uploads, bytes) of one tenant, or of the whole server."""
        if tenant is not None:
            return self._uploads[tenant], self._bytes[tenant]
        return sum(self._uploads.values()), sum(self._bytes.values())

    def _publish(self) -> None:
        if self.metrics is not None:
            uploads, received = self.in_flight()
            self.metrics.uploads_in_flight.set(uploads)
            self.metrics.upload_bytes_in_flight.set(received)


class UploadTicket:
    """One admitted upload: what it has received so far."""

    def __init__(self, admission: UploadAdmission, tenant: str) -> None:
        self.admission = admission
        self.tenant = tenant
        self.received = 0

    def receive(self, n: int) -> None:
        self.admission.receive(self.tenant, n)
        self.received += n


@dataclass(frozen=True)
class SizeLimit:
    """The most bytes one upload of a kind may have, and the setting an operator raises."""

    bytes: int
    setting: str
    what: str  # "adapter", "dataset"

    @classmethod
    def adapters(cls, settings: Settings) -> SizeLimit:
        """max_adapter_upload_bytes, or max_upload_bytes (the one limit older configurations set) when it is 0."""
        if settings.max_adapter_upload_bytes:
            return cls(settings.max_adapter_upload_bytes, "max_adapter_upload_bytes", "adapter")
        return cls(settings.max_upload_bytes, "max_upload_bytes", "adapter")

    @classmethod
    def datasets(cls, settings: Settings) -> SizeLimit:
        return cls(settings.max_upload_bytes, "max_upload_bytes", "dataset")

    def check(self, total: int) -> None:
        if self.bytes and total > self.bytes:
            raise UploadTooLarge(
                f"the {self.what} upload is over its {describe_bytes(self.bytes)} limit ({self.setting} = {self.bytes} bytes); "
                f"send a smaller {self.what}, or ask an operator to raise the limit"
            )


class Upload:
    """Files of one upload as they stream in, under its own temporary directory."""

    def __init__(self, directory: Path, ticket: UploadTicket, limit: SizeLimit, extra_check: Callable[[int], None] | None) -> None:
        self.directory = directory
        self.ticket = ticket
        self.limit = limit
        self.extra_check = extra_check
        self.received = 0
        self._files: dict[str, BinaryIO] = {}

    async def write(self, filename: str, data: bytes) -> None:
        """Refuses the chunk that crosses a limit before writing it; writes in a worker thread."""
        total = self.received + len(data)
        self.limit.check(total)
        if self.extra_check is not None:
            self.extra_check(total)
        self.ticket.receive(len(data))
        self.received = total
        handle = self._files.get(filename)
        if handle is None:
            if Path(filename).name != filename or filename.startswith("."):
                raise InvalidArgument(f"upload file name {filename!r} is not a plain file name")
            handle = self._files[filename] = open(self.directory / filename, "wb")  # noqa: SIM115 - closed in close()
        if data:
            await asyncio.to_thread(handle.write, data)

    def path(self, filename: str) -> Path:
        return self.directory / filename

    def filenames(self) -> list[str]:
        return sorted(self._files)

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


C = TypeVar("C")  # an upload RPC's request message
H = TypeVar("H")  # what its first message's header says


@dataclass(frozen=True)
class ChunkFormat(Generic[C, H]):
    """How one upload RPC's messages read: the first carries the header, and any may carry file bytes."""

    message: Callable[[], C]  # the message type; a stream without any message reads as an empty one
    header: Callable[[C], H]  # the first message's header, checked (raising) before any byte is accepted
    write: Callable[[Upload, C], Awaitable[None]]  # one message's bytes into the upload
    adding: Usage  # what one such upload adds to the tenant's usage, besides its bytes


class Uploads:
    """Where uploads land while they stream in (`<data_dir>/uploads`), and who may upload now."""

    def __init__(self, spool_dir: Path, admission: UploadAdmission) -> None:
        self.spool_dir = spool_dir
        self.admission = admission
        spool_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> Uploads:
        """The server's spool, `<data_dir>/uploads`, emptied of what a previous process left."""
        uploads = cls(settings.data_dir / "uploads", UploadAdmission(UploadLimits.from_settings(settings), metrics))
        uploads.clear()
        return uploads

    def clear(self, stale_after_s: float = STALE_UPLOAD_S) -> None:
        """At start: uploads a crashed process left behind. Only untouched ones, since another
        process sharing the data dir may be receiving an upload right now."""
        cutoff = time.time() - stale_after_s
        for entry in self.spool_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                if max((p.lstat().st_mtime for p in [entry, *entry.iterdir()]), default=0) < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.lstat().st_mtime < cutoff:
                entry.unlink(missing_ok=True)

    @asynccontextmanager
    async def receive(
        self, tenant: str, limit: SizeLimit, extra_check: Callable[[int], None] | None = None
    ) -> AsyncIterator[Upload]:
        """Admits the upload (or refuses it at once) and gives it a directory removed on any exit."""
        with self.admission.admit(tenant) as ticket:
            directory = Path(tempfile.mkdtemp(dir=self.spool_dir, prefix=f"{tenant}-"))
            upload = Upload(directory, ticket, limit, extra_check)
            try:
                yield upload
            finally:
                upload.close()
                shutil.rmtree(directory, ignore_errors=True)  # synchronous: runs even when the call is cancelled

    @asynccontextmanager
    async def receive_chunks(
        self, tenant: str, limit: SizeLimit, request: AsyncIterator[C], chunk_format: ChunkFormat[C, H], quotas: StorageQuotas
    ) -> AsyncIterator[tuple[Upload, C, H]]:
        """An upload RPC's stream, spooled: the header and the tenant's quotas are checked before the
        first byte, then every message's bytes are written. Yields the complete upload (with its first
        message and header) to publish from; its files are removed when the block ends."""
        async with self.receive(tenant, limit) as upload:
            chunks = aiter(request)
            first = await anext(chunks, chunk_format.message())
            header = chunk_format.header(first)
            upload.extra_check = await quota_guard(quotas, tenant, chunk_format.adding)
            await chunk_format.write(upload, first)
            async for chunk in chunks:
                await chunk_format.write(upload, chunk)
            upload.close()
            yield upload, first, header


async def quota_guard(quotas: StorageQuotas, tenant: str, adding: Usage) -> Callable[[int], None]:
    """Refuses at once what the tenant's quotas cannot hold (one more version or dataset), and
    returns a per-chunk check that refuses the upload as soon as its bytes cannot fit either.

    Free room is measured once; only an upload that grows past it measures again (something may
    have been deleted since). The store checks again, under its lock, when it commits.
    """
    await asyncio.to_thread(quotas.check, tenant, adding)
    room = await asyncio.to_thread(quotas.room, tenant)

    def check(total: int) -> None:
        if room is not None and total > room:
            quotas.check(tenant, Usage(bytes=total))

    return check
