"""Per-tenant storage quotas: bytes across adapter versions and datasets, and how many of each.

Usage is never cached: each store reports what it holds (the adapter store from its directories,
the dataset store from its table), so a delete frees quota at once and a restart loses nothing.
A write checks and commits under its tenant's lock (and a global one when a server-wide byte limit
is set), so concurrent publishes can never pass a quota between them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields

from adaptgate.errors import QuotaExceeded
from adaptgate.settings import Settings


def describe_bytes(n: int) -> str:
    """Sizes in the unit people read quotas in: `64 MiB`, `1.5 GiB`, `812 bytes`."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{n} bytes"


@dataclass(frozen=True)
class Usage:
    """What a tenant stores (or what one write adds)."""

    bytes: int = 0
    adapter_versions: int = 0
    datasets: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Usage)))


@dataclass(frozen=True)
class StorageLimits:
    """0 means no limit. The setting names appear in refusals, so an operator knows what to raise."""

    max_storage_bytes_per_tenant: int = 0
    max_adapter_versions_per_tenant: int = 0
    max_datasets_per_tenant: int = 0
    max_storage_bytes: int = 0  # all tenants together

    @classmethod
    def from_settings(cls, settings: Settings) -> StorageLimits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class _Quota:
    """One row of the quota table: which usage field it bounds, by which setting, and how to say it."""

    field: str
    setting: str
    noun: str
    unit: str  # after the limit: "" for bytes (describe_bytes names the unit), " adapter versions"
    remedy: str
    per_tenant: bool = True

    def amount(self, n: int) -> str:
        return describe_bytes(n) if self.field == "bytes" else str(n)


_FREE_BYTES = "delete adapter versions or datasets that are no longer needed, or ask an operator to raise it"
QUOTAS = (
    _Quota("bytes", "max_storage_bytes_per_tenant", "storage", "", _FREE_BYTES),
    _Quota(
        "adapter_versions", "max_adapter_versions_per_tenant", "adapter-version", " adapter versions",
        "delete old versions (DeleteAdapter), or ask an operator to raise it",
    ),
    _Quota(
        "datasets", "max_datasets_per_tenant", "dataset", " datasets",
        "delete datasets that are no longer needed (DeleteDataset), or ask an operator to raise it",
    ),
    _Quota("bytes", "max_storage_bytes", "server-wide storage", "", _FREE_BYTES, per_tenant=False),
)

# Reports what the store holds for one tenant, or for every tenant when given None.
UsageSource = Callable[[str | None], Usage]


class StorageQuotas:
    def __init__(self, limits: StorageLimits | None = None) -> None:
        self.limits = limits or StorageLimits()
        self._sources: list[UsageSource] = []
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._global = threading.Lock()

    def track(self, source: UsageSource) -> None:
        """Each store registers how to count what it holds; usage is the sum over them."""
        self._sources.append(source)

    def usage(self, tenant: str | None) -> Usage:
        total = Usage()
        for source in self._sources:
            total = total + source(tenant)
        return total

    def check(self, tenant: str, adding: Usage) -> None:
        """Raises QuotaExceeded if `adding` would pass a quota; advisory unless under `reserve`."""
        usage: dict[str | None, Usage] = {}  # each scope counted once per check
        for quota in QUOTAS:
            limit = getattr(self.limits, quota.setting)
            extra = getattr(adding, quota.field)
            if not limit or not extra:
                continue
            scope = tenant if quota.per_tenant else None
            if scope not in usage:
                usage[scope] = self.usage(scope)
            used = getattr(usage[scope], quota.field)
            if used + extra > limit:
                raise QuotaExceeded(_refusal(quota, tenant, used, extra, limit))

    def room(self, tenant: str) -> int | None:
        """Bytes the tenant may still store under both byte quotas (None: no byte quota applies)."""
        rooms = []
        for quota in QUOTAS:
            limit = getattr(self.limits, quota.setting)
            if quota.field == "bytes" and limit:
                rooms.append(limit - self.usage(tenant if quota.per_tenant else None).bytes)
        return max(0, min(rooms)) if rooms else None

    @contextmanager
    def reserve(self, tenant: str, adding: Usage) -> Iterator[None]:
        """Check, then run the caller's commit, with no other write of this tenant in between."""
        with ExitStack() as stack:
            if self.limits.max_storage_bytes:
                stack.enter_context(self._global)
            stack.enter_context(self._lock(tenant))
            self.check(tenant, adding)
            yield

    def _lock(self, tenant: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(tenant, threading.Lock())


def _refusal(quota: _Quota, tenant: str, used: int, extra: int, limit: int) -> str:
    owner = f"tenant {tenant!r}" if quota.per_tenant else "the server"
    return (
        f"{owner} has no room under its {quota.noun} quota ({quota.setting}): it uses {quota.amount(used)} "
        f"of {quota.amount(limit)}{quota.unit}, and this adds {quota.amount(extra)}; {quota.remedy}"
    )
