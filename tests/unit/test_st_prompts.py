"""Prompts embed as `SentenceTransformer.encode(prompt_name=...)` embeds them: E5's "query: "/"passage: ",
BGE's instruction, a default prompt, and Pooling's include_prompt=False (prompt tokens left out of the vector).

Each tiny random BERT is saved by sentence-transformers itself with its prompts; the engine, the gRPC
Embeddings service (a real in-process server) and HTTP /v1/embeddings must give the vectors it gives.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from adaptgate.api.admission import TenantAdmission
from adaptgate.api.auth import Principal, TokenAuthenticator
from adaptgate.api.embeddings import EmbeddingsServicer
from adaptgate.api.http import HttpPlane, http_app
from adaptgate.api.rpc import RpcRuntime
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import load_base_model
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from adaptgate.engine.st_config import UnsupportedModelConfig
from adaptgate.errors import InvalidArgument
from adaptgate.inference import Inference
from adaptgate.metrics import Metrics
from adaptgate.v1 import embeddings_pb2 as pb
from adaptgate.v1 import embeddings_pb2_grpc
from tests.unit.test_st_models import LONG_TEXT, TEXTS, assert_same_vectors, engine_embed, save_st_model, st_encode

E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
BGE_PROMPTS = {"query": "Represent this sentence for searching relevant passages: "}
# (name, pooling mode, Normalize, prompts, prompt names to ask for)
PROMPTED = [
    ("e5-mean-normalize", "mean", True, E5_PROMPTS, ["query", "passage"]),
    ("bge-cls-normalize", "cls", True, BGE_PROMPTS, ["query", "document"]),  # "document": every model's, empty here
]
ST_MODES = ["mean", "cls", "weightedmean", "max", "lasttoken", "mean_sqrt_len_tokens"]


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
    return not np.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize(("name", "mode", "normalize", "prompts", "names"), PROMPTED, ids=[p[0] for p in PROMPTED])
def test_a_named_prompt_embeds_like_sentence_transformers(
    tiny_bert_dir: Path, tmp_path: Path, name: str, mode: str, normalize: bool, prompts: dict, names: list[str]
) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / name, mode, normalize, prompts=prompts)
    plain = engine_embed(st_dir, TEXTS)
    for prompt_name in names:
        ours = engine_embed(st_dir, TEXTS, prompt_name=prompt_name)
        assert_same_vectors(ours, st_encode(st_dir, TEXTS, prompt_name=prompt_name))
        assert _differs(ours, plain) == bool(prompts.get(prompt_name)), prompt_name  # the prompt took effect


def test_the_default_prompt_applies_when_a_request_names_none(tiny_bert_dir: Path, tmp_path: Path) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / "e5", "mean", True, prompts=E5_PROMPTS, default_prompt_name="query")
    query = st_encode(st_dir, TEXTS, prompt_name="query")
    assert_same_vectors(st_encode(st_dir, TEXTS), query)  # sentence-transformers applies the default itself
    assert_same_vectors(engine_embed(st_dir, TEXTS), query)
    assert_same_vectors(engine_embed(st_dir, TEXTS, prompt_name="passage"), st_encode(st_dir, TEXTS, prompt_name="passage"))
    # "" opts out of the default, as encode(prompt="") does.
    unprompted = engine_embed(st_dir, TEXTS, prompt_name="")
    assert_same_vectors(unprompted, st_encode(st_dir, TEXTS, prompt=""))
    assert _differs(unprompted, query)


@pytest.mark.parametrize("mode", ST_MODES)
def test_include_prompt_false_leaves_the_prompt_out_like_sentence_transformers(
    tiny_bert_dir: Path, tmp_path: Path, mode: str
) -> None:
    """sentence-transformers counts the prompt's tokens alone (with [CLS], without [SEP]) and pools the rest."""
    prompts = {"query": "Represent this sentence for retrieval: "}
    excluded = save_st_model(tiny_bert_dir, tmp_path / "out", mode, False, prompts=prompts, include_prompt=False)
    assert json.loads((excluded / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    ours = engine_embed(excluded, TEXTS, prompt_name="query")
    assert_same_vectors(ours, st_encode(excluded, TEXTS, prompt_name="query"))
    if mode != "lasttoken":  # the last token is never the prompt's: the same vector either way
        included = save_st_model(tiny_bert_dir, tmp_path / "in", mode, False, prompts=prompts)
        assert _differs(ours, engine_embed(included, TEXTS, prompt_name="query"))


def test_include_prompt_false_with_truncation_matches_sentence_transformers(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The prompt's tokens count toward max_seq_length; what is left of the text after it is pooled."""
    st_dir = save_st_model(
        tiny_bert_dir, tmp_path / "short", "mean", True, max_seq_length=16, prompts=E5_PROMPTS, include_prompt=False
    )
    texts = [*TEXTS, LONG_TEXT]
    ours = engine_embed(st_dir, texts, truncate=True, prompt_name="passage")
    assert_same_vectors(ours, st_encode(st_dir, texts, prompt_name="passage"))


@pytest.mark.parametrize("mode", list(Pooling))
def test_prompt_skips_give_the_same_vectors_packed_and_padded(tiny_bert_dir: Path, mode: Pooling) -> None:
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    packed = BatchForward(base, n_slots=1, max_rank=4, max_labels=2, padding_free=True, cpu_kernels=False)
    padded = BatchForward(base, n_slots=1, max_rank=4, max_labels=2, padding_free=False, cpu_kernels=False)
    ids = base.tokenizer(["query: " + t for t in TEXTS])["input_ids"]
    rows = [Row(i, pooling=mode, normalize=False, pool_skip=3) for i in ids]
    for a, b in zip(packed(rows), padded(rows)):
        np.testing.assert_allclose(a.embedding, b.embedding, rtol=1e-4, atol=1e-5)


def test_an_unknown_prompt_name_is_invalid_argument_listing_the_prompts(tiny_bert_dir: Path, tmp_path: Path) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / "e5", "mean", True, prompts=E5_PROMPTS)
    with pytest.raises(InvalidArgument) as caught:
        engine_embed(st_dir, TEXTS, prompt_name="search_query")
    assert "'search_query'" in caught.value.message
    assert "document, passage, query" in caught.value.message


def test_a_default_prompt_name_that_names_no_prompt_stops_startup(tiny_bert_dir: Path, tmp_path: Path) -> None:
    st_dir = save_st_model(tiny_bert_dir, tmp_path / "e5", "mean", True, prompts=E5_PROMPTS)
    path = st_dir / "config_sentence_transformers.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"default_prompt_name": "search"}))
    with pytest.raises(UnsupportedModelConfig) as caught:
        load_base_model(st_dir, dtype="float32", device="cpu")
    assert "'search'" in caught.value.message and str(path) in caught.value.message


# ----- over the wire: a real gRPC server in this process, and the HTTP app --------------------------------


@pytest.fixture(scope="module")
def e5_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e5") / "e5"
    return save_st_model(tiny_bert_dir, out, "mean", True, prompts=E5_PROMPTS, default_prompt_name="query")


class Served:
    """The engine behind a real gRPC server on a loopback port and the HTTP app, all in one event loop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def __aenter__(self) -> Served:
        base = load_base_model(self.directory, dtype="float32", device="cpu")
        self.engine = Engine(base, EngineConfig(n_slots=1, max_rank=4))
        self.engine.start()
        runtime = RpcRuntime(TokenAuthenticator({"good": Principal("acme")}), Metrics(), TenantAdmission(0))
        inference = Inference(self.engine, cache=None, max_texts=64)  # type: ignore[arg-type]  # no adapters
        self.server = grpc.aio.server()
        servicer = EmbeddingsServicer(runtime, inference, base.name)
        embeddings_pb2_grpc.add_EmbeddingsServicer_to_server(servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = embeddings_pb2_grpc.EmbeddingsStub(self.channel)
        plane = HttpPlane(runtime, inference, None, base.name, base.spec.hidden_size, lambda: True)  # type: ignore[arg-type]
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=http_app(plane)), base_url="http://gateway")
        self.model_name = base.name
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.channel.close()
        await self.server.stop(None)
        await self.engine.stop()

    async def embed(self, **fields: object) -> np.ndarray:
        request = pb.EmbedRequest(texts=TEXTS, **fields)
        response = await self.stub.Embed(request, metadata=(("authorization", "Bearer good"),))
        return np.array([e.values for e in response.embeddings])

    async def http_embed(self, **fields: object) -> httpx.Response:
        body = {"input": TEXTS, "model": self.model_name, **fields}
        return await self.http.post("/v1/embeddings", json=body, headers={"authorization": "Bearer good"})


def _wire(directory: Path) -> dict[str, object]:
    async def run() -> dict[str, object]:
        async with Served(directory) as served:
            out: dict[str, object] = {
                "default": await served.embed(),
                "passage": await served.embed(prompt_name="passage"),
                "none": await served.embed(prompt_name=""),
            }
            try:
                await served.embed(prompt_name="search")
            except grpc.aio.AioRpcError as error:
                out["unknown"] = (error.code(), error.details())
            for key, fields in (("http-default", {}), ("http-passage", {"prompt_name": "passage"}),
                                ("http-unknown", {"prompt_name": "search"})):
                out[key] = await served.http_embed(**fields)
            return out

    return asyncio.run(run())


@pytest.fixture(scope="module")
def wire(e5_dir: Path) -> Iterator[dict[str, object]]:
    yield _wire(e5_dir)


def test_grpc_embed_takes_a_prompt_name_and_the_default(e5_dir: Path, wire: dict[str, object]) -> None:
    assert_same_vectors(wire["default"], st_encode(e5_dir, TEXTS))  # type: ignore[arg-type]
    assert_same_vectors(wire["passage"], st_encode(e5_dir, TEXTS, prompt_name="passage"))  # type: ignore[arg-type]
    assert_same_vectors(wire["none"], st_encode(e5_dir, TEXTS, prompt=""))  # type: ignore[arg-type]


def test_grpc_an_unknown_prompt_name_is_invalid_argument(wire: dict[str, object]) -> None:
    code, details = wire["unknown"]  # type: ignore[misc]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'search'" in details and "document, passage, query" in details


def test_http_embeddings_take_a_prompt_name(e5_dir: Path, wire: dict[str, object]) -> None:
    for key, kwargs in (("http-default", {}), ("http-passage", {"prompt_name": "passage"})):
        response = wire[key]
        assert response.status_code == 200, response.text  # type: ignore[attr-defined]
        vectors = np.array([d["embedding"] for d in response.json()["data"]])  # type: ignore[attr-defined]
        assert_same_vectors(vectors, st_encode(e5_dir, TEXTS, **kwargs))
    unknown = wire["http-unknown"]
    assert unknown.status_code == 400 and "document, passage, query" in unknown.json()["error"]["message"]  # type: ignore[attr-defined]

