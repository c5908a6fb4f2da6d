"""Admission, observed: the one call every Embed and Classify makes on both protocols, with the
tenant, the rows and the adapters, so the access line and the trace learn them in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

from adaptgate.api.admission import TenantAdmission
from adaptgate.observability.requests import current


class ObservedAdmission(TenantAdmission):
    """`TenantAdmission` whose `admitted` notes its arguments on the current request and, when the
    request is traced, runs in an `admission` span (a refusal, paced or not, ends it with the error)."""

    @asynccontextmanager
    async def admitted(
        self, tenant: str, rows: int = 0, adapters: Iterable[Hashable] = (), deadline: float | None = None
    ) -> AsyncIterator[None]:
        wanted = list(adapters)
        request = current()
        if request is not None:
            request.admitting(tenant, rows, [str(a) for a in wanted])
        if request is None or not request.span.is_recording():  # no trace: no span to open (the usual case)
            async with super().admitted(tenant, rows, wanted, deadline):
                yield
            return
        async with AsyncExitStack() as stack:
            with request.phase("admission") as span:
                span.set_attributes({"adaptgate.tenant": tenant, "adaptgate.rows": rows})
                await stack.enter_async_context(super().admitted(tenant, rows, wanted, deadline))
            yield
