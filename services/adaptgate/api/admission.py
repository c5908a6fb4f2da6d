"""Per-tenant admission: one tenant's burst cannot take every slot of the shared batcher."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from adaptgate.errors import ResourceExhausted


class TenantBusy(ResourceExhausted):
    """The tenant already has its limit of requests in flight."""


class TenantAdmission:
    def __init__(self, max_inflight_per_tenant: int) -> None:
        self.limit = max_inflight_per_tenant
        self._inflight: Counter[str] = Counter()

    @contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Runs on the event loop only, so the counter needs no lock."""
        if self.limit and self._inflight[tenant] >= self.limit:
            raise TenantBusy(f"tenant {tenant!r} already has {self.limit} requests in flight; retry with backoff")
        self._inflight[tenant] += 1
        try:
            yield
        finally:
            self._inflight[tenant] -= 1
