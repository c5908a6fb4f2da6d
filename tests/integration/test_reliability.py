"""Faults and hostile input against the real gateway (RELIABILITY 2, 12, 28)."""

from __future__ import annotations

import random
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adaptgate.client import Client
from adaptgate.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2
from tests.integration.conftest import Gateway, auth, running_gateway

pytestmark = pytest.mark.integration
MODULES = (embeddings_pb2, classifier_pb2, adapters_pb2, datasets_pb2, finetune_pb2)


def methods():
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}", method


def raw_call(channel: grpc.Channel, path: str, method, payload: bytes, token: str) -> grpc.StatusCode:
    kw = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
    md = auth(token)
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path, **kw)(iter([payload, payload]), metadata=md, timeout=20))
        elif method.client_streaming:
            channel.stream_unary(path, **kw)(iter([payload, payload]), metadata=md, timeout=20)
        elif method.server_streaming:
            list(channel.unary_stream(path, **kw)(payload, metadata=md, timeout=20))
        else:
            channel.unary_unary(path, **kw)(payload, metadata=md, timeout=20)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_fuzzed_payloads_never_crash_the_server(gateway: Gateway) -> None:
    """Random bytes and random field values on every method: documented codes only, healthy afterwards."""
    rng = random.Random(1234)
    allowed = {
        grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    seen: dict[grpc.StatusCode, int] = {}
    with gateway.channel() as channel:
        for path, method in methods():
            if method.name in ("WatchJob", "CancelJob", "SubmitJob"):
                continue  # valid random ids would start or stop real jobs; covered by the job tests
            for _ in range(25):
                payload = rng.randbytes(rng.randrange(0, 200))
                code = raw_call(channel, path, method, payload, "acme-token")
                seen[code] = seen.get(code, 0) + 1
                assert code in allowed and code != grpc.StatusCode.INTERNAL, (path, code, payload)
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert Client(gateway.target, "acme-token").embed(["still alive"]).embeddings


STRINGS = ("", " ", "../../etc/passwd", "acme/x@v999", "bob/secret:prod", "\u0000\udfff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "é" * 300, "x" * 5000)


def random_message(message_class, rng: random.Random):
    """A request of the method's own type with random, often hostile, values in every scalar field."""
    from google.protobuf.descriptor import FieldDescriptor as F

    message = message_class()
    for field in message.DESCRIPTOR.fields:
        if field.type == F.TYPE_MESSAGE:
            continue
        if field.type == F.TYPE_STRING:
            values = [rng.choice(STRINGS) for _ in range(rng.randrange(0, 4))]
        elif field.type == F.TYPE_BYTES:
            values = [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(0, 3))]
        elif field.type == F.TYPE_BOOL:
            values = [rng.random() < 0.5]
        elif field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            values = [rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf"), rng.random()])]
        elif field.type == F.TYPE_ENUM:
            values = [rng.choice([v.number for v in field.enum_type.values] + [99])]
        else:  # integers of every width
            unsigned = field.type in (F.TYPE_UINT32, F.TYPE_UINT64, F.TYPE_FIXED32, F.TYPE_FIXED64)
            bits = 64 if field.type in (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64) else 32
            top = 2 ** (bits - (0 if unsigned else 1)) - 1
            values = [rng.choice([0, 1, top, rng.randrange(0, 1 << 20)] + ([] if unsigned else [-1, -top]))]
        if field.is_repeated:
            getattr(message, field.name).extend(values)
        elif values:
            setattr(message, field.name, values[0])
    return message


def test_random_field_values_never_crash_the_server(gateway: Gateway) -> None:
    """Well-formed requests with hostile values in every field of every method: a clear code, never INTERNAL."""
    from google.protobuf import message_factory

    rng = random.Random(4321)
    with gateway.channel() as channel:
        for path, method in methods():
            request_class = message_factory.GetMessageClass(method.input_type)
            for _ in range(15):
                payload = random_message(request_class, rng).SerializeToString()
                code = raw_call(channel, path, method, payload, "acme-token")
                assert code != grpc.StatusCode.INTERNAL and code != grpc.StatusCode.UNKNOWN, (path, code, payload[:200])
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_method_is_unimplemented(gateway: Gateway) -> None:
    with gateway.channel() as channel:
        call = channel.unary_unary("/adaptgate.v1.Embeddings/Nope", request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(b"", metadata=auth("acme-token"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_message_over_the_size_limit_is_resource_exhausted(gateway: Gateway) -> None:
    request = embeddings_pb2.EmbedRequest(texts=["x" * (1 << 20)] * 17)
    with pytest.raises(grpc.RpcError) as info:
        Client(gateway.target, "acme-token").embeddings.Embed(request, metadata=auth("acme-token"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def queued_texts(gateway: Gateway) -> float:
    body = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    return float(next(l.split()[-1] for l in body.splitlines() if l.startswith("adaptgate_queue_depth ")))


def wait_until_queued(gateway: Gateway, texts: int, timeout: float = 30.0) -> None:
    """Polls the queue-depth gauge: the requests are on the server, not merely sent."""
    deadline = time.monotonic() + timeout
    while queued_texts(gateway) < texts:
        assert time.monotonic() < deadline, f"fewer than {texts} texts were ever queued"
        time.sleep(0.01)


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path: Path) -> None:
    """Health goes NOT_SERVING, in-flight RPCs finish, the process exits within the drain period."""
    with running_gateway(tmp_path, "--drain-seconds", "20") as gateway:
        client = Client(gateway.target, "acme-token")
        texts = ["a message that keeps the engine busy for a while " * 4] * 256
        results: list[object] = []

        def busy() -> None:
            try:
                results.append(len(client.embed(texts).embeddings))
            except grpc.RpcError as exc:
                results.append(exc.code())

        workers = [threading.Thread(target=busy) for _ in range(4)]  # 1,024 texts: one tenant's whole queue budget
        for w in workers:
            w.start()
        wait_until_queued(gateway, 3 * 256 + 1)  # more than three requests hold: all four were admitted
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        for w in workers:
            w.join(timeout=60)
        gateway.process.wait(timeout=40)
        assert time.monotonic() - started < 25
        assert results == [256] * 4, results
        with pytest.raises(grpc.RpcError) as info:
            client.embed(["after shutdown"])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
