"""Every error kind maps to its gRPC status, on unary and streaming RPCs alike (RELIABILITY 10, 11, 30, 32)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from adaptgate.api.admission import TenantAdmission
from adaptgate.api.auth import Principal, TokenAuthenticator, ensure_dev_tokens, load_tokens
from adaptgate.api.errors import STATUS_BY_CODE
from adaptgate.api.rpc import RpcRuntime, server_stream, unary
from adaptgate.errors import AdaptgateError, AdapterNotFound, ErrorCode, Unauthenticated
from adaptgate.metrics import Metrics


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


class FakeContext:
    def __init__(self, token: str | None = "good") -> None:
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def invocation_metadata(self):
        return self.metadata

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class Servicer:
    def __init__(self, error: BaseException | None) -> None:
        self.runtime = RpcRuntime(TokenAuthenticator({"good": Principal("acme")}), Metrics(), TenantAdmission(0))
        self.error = error

    @unary
    async def Unary(self, request, context, principal):
        if self.error:
            raise self.error
        return principal.tenant

    @server_stream
    async def Stream(self, request, context, principal):
        yield principal.tenant
        if self.error:
            raise self.error


def error_of(code: ErrorCode) -> AdaptgateError:
    error = AdaptgateError(f"a sentence about {code.name}")
    error.code = code
    return error


async def call_stream(servicer: Servicer, context: FakeContext) -> list[str]:
    return [item async for item in servicer.Stream(None, context)]


@pytest.mark.parametrize("code", list(ErrorCode))
def test_each_error_kind_maps_to_its_status_unary_and_stream(code: ErrorCode) -> None:
    expected = STATUS_BY_CODE[code]
    assert expected.name == code.name
    servicer = Servicer(error_of(code))
    context = FakeContext()
    with pytest.raises(Aborted) as unary_abort:
        asyncio.run(servicer.Unary(None, context))
    retry_hint = getattr(context, "trailing", None)
    assert (retry_hint == (("retry-after-ms", "250"),)) == (code is ErrorCode.RESOURCE_EXHAUSTED)
    with pytest.raises(Aborted) as stream_abort:
        asyncio.run(call_stream(servicer, FakeContext()))
    for aborted in (unary_abort.value, stream_abort.value):
        assert aborted.code == expected
        assert aborted.details == f"a sentence about {code.name}"
    counted = servicer.runtime.metrics.requests.labels("Unary", expected.name, "grpc")._value.get()
    assert counted == 1


def test_unhandled_exception_is_internal_with_a_request_id_and_no_trace() -> None:
    servicer = Servicer(KeyError("secret internals"))
    with pytest.raises(Aborted) as aborted:
        asyncio.run(servicer.Unary(None, FakeContext()))
    assert aborted.value.code == grpc.StatusCode.INTERNAL
    assert "request id" in aborted.value.details and "secret" not in aborted.value.details


def test_a_stream_the_client_closes_early_is_counted_once_and_not_failed() -> None:
    """A closed stream (GeneratorExit at its yield) passes through the wrapper: no abort, no INTERNAL."""
    servicer = Servicer(None)

    async def first_only() -> str:
        stream = servicer.Stream(None, FakeContext())
        first = await anext(stream)
        await stream.aclose()
        return first

    assert asyncio.run(first_only()) == "acme"
    counted = servicer.runtime.metrics.requests.labels
    assert (counted("Stream", "OK", "grpc")._value.get(), counted("Stream", "INTERNAL", "grpc")._value.get()) == (1, 0)


@pytest.mark.parametrize("method", ["Unary", "Stream"])
def test_a_cancelled_call_stays_cancelled_and_is_counted_as_cancelled(method: str) -> None:
    servicer = Servicer(asyncio.CancelledError())
    call = servicer.Unary(None, FakeContext()) if method == "Unary" else call_stream(servicer, FakeContext())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(call)
    assert servicer.runtime.metrics.requests.labels(method, "CANCELLED", "grpc")._value.get() == 1


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_token_is_unauthenticated(token: str | None) -> None:
    with pytest.raises(Aborted) as aborted:
        asyncio.run(Servicer(None).Unary(None, FakeContext(token)))
    assert aborted.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_malformed_authorization_header() -> None:
    auth = TokenAuthenticator({"good": Principal("acme")})
    for header in ("good", "Basic good", "Bearer "):
        with pytest.raises(Unauthenticated):
            auth.authenticate((("authorization", header),))
    assert auth.authenticate((("authorization", "Bearer good"),)) == Principal("acme")


def test_another_tenants_adapter_looks_missing() -> None:
    with pytest.raises(AdapterNotFound, match="not found"):
        Principal("acme").adapter("globex/spam")
    assert Principal("root", admin=True).adapter("globex/spam").tenant == "globex"


def test_dev_tokens_are_created_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    first = ensure_dev_tokens(path)
    assert ensure_dev_tokens(path) == first
    tokens = load_tokens(path)
    assert tokens[first[0]] == Principal("dev") and tokens[first[1]].admin
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("body", ["not json", json.dumps({"tokens": {}}), json.dumps({"tokens": {"t": {"tenant": "../x"}}})])
def test_bad_token_files_refuse_to_start(tmp_path: Path, body: str) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(body)
    with pytest.raises(ValueError, match="token file"):
        load_tokens(path)


def test_one_tenant_cannot_hold_more_than_its_share() -> None:
    from adaptgate.api.admission import TenantBusy

    admission = TenantAdmission(2)
    with admission.admit("acme"), admission.admit("acme"):
        with pytest.raises(TenantBusy, match="2 requests in flight"):
            with admission.admit("acme"):
                pass
        with admission.admit("globex"):  # other tenants are unaffected
            pass
    with admission.admit("acme"):  # slots come back when requests finish
        pass


def test_malformed_messages_are_invalid_argument_in_unary_and_client_streams() -> None:
    from adaptgate.api.malformed import Malformed, tolerant
    from adaptgate.v1 import embeddings_pb2

    parsed = tolerant(embeddings_pb2.EmbedRequest.FromString)(b"\xff\xff\xff")
    assert isinstance(parsed, Malformed)
    with pytest.raises(Aborted) as aborted:
        asyncio.run(Servicer(None).Unary(parsed, FakeContext()))
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in aborted.value.details

    class StreamServicer(Servicer):
        @unary
        async def Upload(self, request, context, principal):
            return [item async for item in request]

    async def chunks():
        yield embeddings_pb2.EmbedRequest()
        yield parsed

    with pytest.raises(Aborted) as aborted:
        asyncio.run(StreamServicer(None).Upload(chunks(), FakeContext()))
    assert aborted.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_tokens_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """RELIABILITY 32: every known token goes through hmac.compare_digest, matched or not (no early exit)."""
    import hmac

    from adaptgate.api import auth

    calls: list[bytes] = []
    original = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    principals = {f"token-{i}": auth.Principal(f"tenant-{i}") for i in range(5)}
    authenticator = auth.TokenAuthenticator(principals)
    assert authenticator.authenticate((("authorization", "Bearer token-0"),)).tenant == "tenant-0"
    assert len(calls) == 5
    with pytest.raises(Unauthenticated):
        authenticator.authenticate((("authorization", "Bearer token-9"),))
    assert len(calls) == 10


@pytest.mark.parametrize(
    ("module", "name", "reason"),
    [
        ("adaptgate.errors", "UploadTooLarge", "upload_too_large"),
        ("adaptgate.errors", "UploadsBusy", "uploads_busy"),
        ("adaptgate.errors", "QuotaExceeded", "quota_exceeded"),
        ("adaptgate.api.admission", "TenantBusy", "tenant_busy"),
        ("adaptgate.api.admission", "TenantQueueFull", "tenant_queue_full"),
        ("adaptgate.api.admission", "TenantAdaptersBusy", "tenant_adapters_busy"),
        ("adaptgate.api.admission", "AdapterSlotsBusy", "adapter_slots_busy"),
        ("adaptgate.api.admission", "DeadlineTooShort", "deadline_too_short"),
    ],
)
def test_refusals_are_resource_exhausted_with_a_retry_hint_and_counted_by_reason(module: str, name: str, reason: str) -> None:
    import importlib

    servicer = Servicer(getattr(importlib.import_module(module), name)("a sentence naming the limit"))
    context = FakeContext()
    with pytest.raises(Aborted) as aborted:
        asyncio.run(servicer.Unary(None, context))
    assert aborted.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert aborted.value.details == "a sentence naming the limit"
    assert context.trailing == (("retry-after-ms", "250"),)
    assert servicer.runtime.metrics.rejected.labels(reason)._value.get() == 1
