"""adaptgate_request_stage_seconds: where a request's time goes, per method and stage, on /metrics of a real
in-process gateway (gRPC on loopback, the tiny model)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest_asyncio
import torch

from adaptgate.adapters.format import head_only_files
from adaptgate.metrics import StageHistogram
from adaptgate.server import Gateway, build
from adaptgate.settings import Settings
from adaptgate.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    classifier_pb2,
    classifier_pb2_grpc,
    embeddings_pb2,
    embeddings_pb2_grpc,
)

AUTH = (("authorization", "Bearer acme-token"),)
SERIES = re.compile(r'^adaptgate_request_stage_seconds_(count|sum)\{method="(\w+)",stage="(\w+)"\} (\S+)$', re.M)
LOOP_STAGES = {"decode", "auth", "resolve", "admission", "tokenize", "queue_wait", "forward", "answer", "observe", "encode"}


@pytest_asyncio.fixture(loop_scope="function")
async def gateway(tmp_path: Path, tiny_bert_dir: Path) -> AsyncIterator[Gateway]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"acme-token": {"tenant": "acme"}}}))
    settings = Settings(
        role="all", host="127.0.0.1", port=0, http_port=-1, metrics_port=0, data_dir=tmp_path / "data",
        tokens_file=tokens, base_model=str(tiny_bert_dir), device="cpu", dtype="float32", cpu_kernels="off",
        reflection=False, ray_address=None,
    )
    gateway = await build(settings)
    try:
        yield gateway
    finally:
        await gateway.stop(0)


async def scrape(port: int) -> dict[tuple[str, str, str], float]:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {(method, stage, kind): float(value) for kind, method, stage, value in SERIES.findall(text)}


async def test_one_embed_and_one_classify_fill_every_stage_once(gateway: Gateway) -> None:
    files = head_only_files(torch.randn(2, 32), torch.zeros(2), ["ham", "spam"], "", "test")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        chunks = [adapters_pb2.UploadAdapterChunk(name="spam")]
        chunks += [adapters_pb2.UploadAdapterChunk(filename=name, data=data) for name, data in files.items()]
        await adapters_pb2_grpc.AdaptersStub(channel).UploadAdapter(iter(chunks), metadata=AUTH, timeout=30)
        await embeddings_pb2_grpc.EmbeddingsStub(channel).Embed(
            embeddings_pb2.EmbedRequest(texts=["one text", "and another"]), metadata=AUTH, timeout=30
        )
        answer = await classifier_pb2_grpc.ClassifierStub(channel).Classify(
            classifier_pb2.ClassifyRequest(texts=["win a prize"], adapter="spam"), metadata=AUTH, timeout=30
        )
    assert answer.results[0].label in ("ham", "spam")
    series = await scrape(gateway.metrics_port)
    counts = {(m, s): n for (m, s, kind), n in series.items() if kind == "count"}
    assert {s for (m, s) in counts if m == "Embed"} == LOOP_STAGES  # no adapter: nothing leased
    assert {s for (m, s) in counts if m == "Classify"} == LOOP_STAGES | {"lease"}
    assert all(n == 1 for (m, _), n in counts.items() if m in ("Embed", "Classify")), counts
    assert all(series[(m, s, "sum")] >= 0 for (m, s) in counts)
    assert series[("Classify", "forward", "sum")] > 0 and series[("Embed", "forward", "sum")] > 0
    assert not any(m == "UploadAdapter" for (m, _) in counts), "a client stream is no one request's stages"


def test_the_histogram_count_is_its_last_bucket() -> None:
    histogram = StageHistogram(buckets=(0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.002, 5.0):
        histogram.observe("Embed", "auth", seconds)
    [family] = histogram.collect()
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("adaptgate_request_stage_seconds_bucket", "0.001")] == 2  # le: a value on the bound counts
    assert samples[("adaptgate_request_stage_seconds_bucket", "0.01")] == 3
    assert samples[("adaptgate_request_stage_seconds_bucket", "+Inf")] == 4
    assert samples[("adaptgate_request_stage_seconds_count", None)] == 4
    assert abs(samples[("adaptgate_request_stage_seconds_sum", None)] - 5.0035) < 1e-9
