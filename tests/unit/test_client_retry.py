"""adaptgate_client retries against real in-process gRPC servers: it waits as the server's back-off trailer
says (`retry-after-ms`, or gRPC's `grpc-retry-pushback-ms`), then succeeds; it gives up after its attempts,
before a wait that would outlast the call's deadline, at once on a status that is not worth retrying, and when
the server says not to retry. Uploads are re-sent whole; a dropped WatchJob resumes without repeating events."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from adaptgate_client import AsyncClient, Client, RetryPolicy
from adaptgate_client.v1 import (
    datasets_pb2, datasets_pb2_grpc, embeddings_pb2, embeddings_pb2_grpc, finetune_pb2, finetune_pb2_grpc,
)

WAIT_MS = 200


class Refusing:
    """Refuses the first `refusals` calls with `code` and the given trailers, then answers; records arrivals."""

    def __init__(self, refusals: int, trailers: tuple[tuple[str, str], ...], code: grpc.StatusCode) -> None:
        self.refusals, self.trailers, self.code = refusals, trailers, code
        self.arrivals: list[float] = []

    def refuse(self, context: grpc.ServicerContext) -> bool:
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) > self.refusals:
            return False
        context.set_trailing_metadata(self.trailers)
        context.abort(self.code, "over capacity, back off")
        return True  # never reached: abort raises

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


class Embeddings(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, refusing: Refusing) -> None:
        self.refusing = refusing

    def Embed(self, request: embeddings_pb2.EmbedRequest, context: grpc.ServicerContext) -> embeddings_pb2.EmbedResponse:
        self.refusing.refuse(context)
        return embeddings_pb2.EmbedResponse(
            embeddings=[embeddings_pb2.Embedding(values=[float(len(t)), 1.0], tokens=len(t)) for t in request.texts],
            model="fake")


class Datasets(datasets_pb2_grpc.DatasetsServicer):
    def __init__(self, refusing: Refusing) -> None:
        self.refusing = refusing
        self.received = b""

    def UploadDataset(self, request_iterator: Iterator[datasets_pb2.UploadDatasetChunk], context: grpc.ServicerContext) -> datasets_pb2.Dataset:
        chunks = list(request_iterator)
        self.refusing.refuse(context)
        self.received = b"".join(c.data for c in chunks)
        return datasets_pb2.Dataset(id="ds-1", name=chunks[0].name, size_bytes=len(self.received))


class Finetune(finetune_pb2_grpc.FinetuneServicer):
    """WatchJob: the first call streams events 1-2 and drops with UNAVAILABLE; the next streams 1-4."""

    def __init__(self) -> None:
        self.calls = 0

    def WatchJob(self, request: finetune_pb2.JobRef, context: grpc.ServicerContext) -> Iterator[finetune_pb2.JobEvent]:
        self.calls += 1
        last = 2 if self.calls == 1 else 4
        for seq in range(1, last + 1):
            yield finetune_pb2.JobEvent(job_id=request.id, seq=seq, state=finetune_pb2.RUNNING, kind="progress")
        if self.calls == 1:
            context.set_trailing_metadata((("retry-after-ms", "10"),))
            context.abort(grpc.StatusCode.UNAVAILABLE, "control replica restarting")


def serve(refusing: Refusing) -> tuple[grpc.Server, str, Datasets, Finetune]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    datasets, finetune = Datasets(refusing), Finetune()
    embeddings_pb2_grpc.add_EmbeddingsServicer_to_server(Embeddings(refusing), server)
    datasets_pb2_grpc.add_DatasetsServicer_to_server(datasets, server)
    finetune_pb2_grpc.add_FinetuneServicer_to_server(finetune, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}", datasets, finetune


@pytest.fixture
def refusing(request: pytest.FixtureRequest) -> Refusing:
    refusals, trailers, code = getattr(request, "param", (2, (("retry-after-ms", str(WAIT_MS)),), grpc.StatusCode.RESOURCE_EXHAUSTED))
    return Refusing(refusals, trailers, code)


@pytest.fixture
def target(refusing: Refusing) -> Iterator[str]:
    server, address, *_ = serve(refusing)
    yield address
    server.stop(None)


TRAILERS = [(("retry-after-ms", str(WAIT_MS)),), (("grpc-retry-pushback-ms", str(WAIT_MS)),)]


@pytest.mark.parametrize("refusing", [(2, t, grpc.StatusCode.RESOURCE_EXHAUSTED) for t in TRAILERS]
                         + [(2, TRAILERS[0], grpc.StatusCode.UNAVAILABLE)], indirect=True)
def test_waits_as_the_server_says_then_succeeds(refusing: Refusing, target: str) -> None:
    # Without the trailer the back-off would start at 1 ms: a gap this long is the server's word being kept.
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    with Client(target, "t", retry_policy=policy) as client:
        result = client.embed(["abc", "de"])
    assert result.vectors.tolist() == [[3.0, 1.0], [2.0, 1.0]] and result.tokens == [3, 2]
    assert len(refusing.arrivals) == 3
    assert all(gap >= WAIT_MS / 1000 * 0.95 for gap in refusing.gaps()), refusing.gaps()


@pytest.mark.parametrize("refusing", [(99, TRAILERS[0], grpc.StatusCode.RESOURCE_EXHAUSTED)], indirect=True)
def test_gives_up_after_max_attempts_with_the_servers_status(refusing: Refusing, target: str) -> None:
    with Client(target, "t", retry_policy=RetryPolicy(max_attempts=3)) as client, pytest.raises(grpc.RpcError) as info:
        client.embed(["x"])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(refusing.arrivals) == 3


@pytest.mark.parametrize("refusing", [(99, (("retry-after-ms", "5000"),), grpc.StatusCode.RESOURCE_EXHAUSTED)], indirect=True)
def test_never_waits_past_the_deadline(refusing: Refusing, target: str) -> None:
    started = time.monotonic()
    with Client(target, "t", timeout=1.0) as client, pytest.raises(grpc.RpcError) as info:
        client.embed(["x"])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(refusing.arrivals) == 1 and time.monotonic() - started < 1.0


@pytest.mark.parametrize("refusing", [(1, TRAILERS[0], grpc.StatusCode.INVALID_ARGUMENT),
                                      (1, (("grpc-retry-pushback-ms", "-1"),), grpc.StatusCode.UNAVAILABLE)], indirect=True)
def test_no_retry_on_a_final_status_or_when_told_not_to(refusing: Refusing, target: str) -> None:
    with Client(target, "t") as client, pytest.raises(grpc.RpcError) as info:
        client.embed(["x"])
    assert info.value.code() == refusing.code
    assert len(refusing.arrivals) == 1


def test_an_upload_is_sent_whole_again_on_retry(tmp_path: Path) -> None:
    refusing = Refusing(2, TRAILERS[0], grpc.StatusCode.RESOURCE_EXHAUSTED)
    server, address, datasets, _ = serve(refusing)
    data = b"".join(b'{"text": "row %d", "label": "a"}\n' % i for i in range(60000))  # over one chunk
    (tmp_path / "rows.jsonl").write_bytes(data)
    try:
        with Client(address, "t") as client:
            dataset = client.upload_dataset(tmp_path / "rows.jsonl")
    finally:
        server.stop(None)
    assert len(refusing.arrivals) == 3
    assert datasets.received == data and dataset.size_bytes == len(data) and dataset.name == "rows"


def test_a_dropped_watch_resumes_without_repeating_events() -> None:
    server, address, _, finetune = serve(Refusing(0, (), grpc.StatusCode.OK))
    try:
        with Client(address, "t") as client:
            seqs = [e.seq for e in client.watch_job("job-1")]
    finally:
        server.stop(None)
    assert finetune.calls == 2
    assert seqs == [1, 2, 3, 4]


class AsyncEmbeddings(embeddings_pb2_grpc.EmbeddingsServicer):
    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.arrivals: list[float] = []

    async def Embed(self, request: embeddings_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> embeddings_pb2.EmbedResponse:
        self.arrivals.append(time.monotonic())
        if len(self.arrivals) <= self.refusals:
            context.set_trailing_metadata((("retry-after-ms", str(WAIT_MS)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "over capacity")
        return embeddings_pb2.EmbedResponse(embeddings=[embeddings_pb2.Embedding(packed=b"\0\0\x80?")], model="fake")


@pytest.mark.parametrize("refusals, attempts, succeeds", [(2, 3, True), (5, 3, False)])
async def test_async_client_waits_as_told_and_bounds_attempts(refusals: int, attempts: int, succeeds: bool) -> None:
    server = grpc.aio.server()
    servicer = AsyncEmbeddings(refusals)
    embeddings_pb2_grpc.add_EmbeddingsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        policy = RetryPolicy(max_attempts=attempts, initial_backoff=0.001, max_backoff=0.001)
        async with AsyncClient(f"127.0.0.1:{port}", "t", retry_policy=policy) as client:
            if succeeds:
                assert (await client.embed(["x"])).vectors.tolist() == [[1.0]]
            else:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await client.embed(["x"])
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)
    assert len(servicer.arrivals) == attempts
    gaps = [b - a for a, b in zip(servicer.arrivals, servicer.arrivals[1:])]
    assert all(gap >= WAIT_MS / 1000 * 0.95 for gap in gaps), gaps
