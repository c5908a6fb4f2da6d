"""The HTTP API against the real server, through the official `openai` client and LangChain's OpenAI
embeddings class: the same vectors as gRPC `Embed`, an adapter selected by `model`, base64 encoding,
OpenAI-shaped errors, the same tokens; and `/v1/classify` answering as gRPC `Classify` does."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tiktoken
import torch
from langchain_openai import OpenAIEmbeddings

from adaptgate.adapters.format import head_only_files
from adaptgate.client import Client
from adaptgate.engine.model import fingerprint, packaged_model_dir
from adaptgate.v1 import classifier_pb2
from tests.integration.conftest import Gateway
from tests.unit.peft_adapters import make_peft_adapter

pytestmark = pytest.mark.integration
TEXTS = ["the cat sat on the mat", "URGENT! you have won a prize", "see you at the weekly meeting"]


def openai_client(gateway: Gateway, token: str = "acme-token") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.http_url}/v1", api_key=token, max_retries=0, timeout=60)


def base_model(gateway: Gateway) -> str:
    return Client(gateway.target, "acme-token").embed(["x"]).model


@pytest.fixture(scope="module")
def http_adapter(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("http-adapter")
    make_peft_adapter(packaged_model_dir(), out, num_labels=2, rank=4, seed=5)
    Client(gateway.target, "acme-token").upload_adapter(out, "http-lora", alias="prod")
    return "http-lora:prod"


def grpc_vectors(gateway: Gateway, adapter: str = "") -> np.ndarray:
    return Client(gateway.target, "acme-token").embed_array(TEXTS, adapter)


def test_openai_embeddings_equal_grpc_embed_in_float_and_base64(gateway: Gateway) -> None:
    model = base_model(gateway)
    expected = grpc_vectors(gateway)
    client = openai_client(gateway)
    floats = client.embeddings.create(model=model, input=TEXTS)  # the client asks for base64 itself and decodes it
    packed = client.embeddings.create(model=model, input=TEXTS, encoding_format="base64")  # handed over as sent
    for response, decode in ((floats, np.asarray), (packed, lambda s: np.frombuffer(base64.b64decode(s), "<f4"))):
        got = np.array([decode(d.embedding) for d in sorted(response.data, key=lambda d: d.index)], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert response.model == model and response.usage.prompt_tokens > len(TEXTS)
    single = client.embeddings.create(model=model, input=TEXTS[0])
    np.testing.assert_allclose(np.array(single.data[0].embedding, dtype=np.float32), expected[0], atol=1e-6)


def test_an_adapter_is_selected_through_model(gateway: Gateway, http_adapter: str) -> None:
    expected = grpc_vectors(gateway, http_adapter)
    assert not np.allclose(expected, grpc_vectors(gateway), atol=1e-4), "the adapter changes the embeddings"
    response = openai_client(gateway).embeddings.create(model=http_adapter, input=TEXTS)
    np.testing.assert_allclose(np.array([d.embedding for d in response.data], dtype=np.float32), expected, atol=1e-6)
    ids = [m.id for m in openai_client(gateway).models.list().data]
    assert ids[0] == base_model(gateway) and "http-lora@v1" in ids and http_adapter in ids
    assert "http-lora@v1" not in [m.id for m in openai_client(gateway, "globex-token").models.list().data]


def test_errors_reach_openai_clients_with_their_status_and_sentence(gateway: Gateway, http_adapter: str) -> None:
    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        openai_client(gateway, "nope").embeddings.create(model=base_model(gateway), input=TEXTS)
    assert unauthenticated.value.status_code == 401 and "token is not valid" in unauthenticated.value.message
    with pytest.raises(openai.NotFoundError) as other_tenant:  # another tenant's adapter: the same NOT_FOUND as a missing one
        openai_client(gateway, "globex-token").embeddings.create(model=http_adapter, input=TEXTS)
    assert "not found" in other_tenant.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        openai_client(gateway).embeddings.create(model=base_model(gateway), input=[])
    assert empty.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as dimensions:
        openai_client(gateway).embeddings.create(model=base_model(gateway), input=TEXTS, dimensions=7)
    assert "7" in dimensions.value.message


def test_health_readiness_and_the_openapi_document(gateway: Gateway) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"{gateway.http_url}{path}", timeout=10) as response:
            assert response.status == 200
    with urllib.request.urlopen(f"{gateway.http_url}/openapi.json", timeout=10) as response:
        document = json.load(response)
    assert {"/v1/embeddings", "/v1/models", "/v1/classify"} <= set(document["paths"])
    request = urllib.request.Request(f"{gateway.http_url}/v1/embeddings", data=b"{not json", method="POST",
                                     headers={"Authorization": "Bearer acme-token", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=10)
    assert malformed.value.code == 400 and json.load(malformed.value)["error"]["code"] == "INVALID_ARGUMENT"


def test_langchain_openai_embeddings_equal_grpc_embed_with_and_without_an_adapter(
    gateway: Gateway, http_adapter: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A RAG framework's OpenAI class as its users configure it for a self-hosted server: strings, not tiktoken ids."""

    def no_tiktoken(*_: object, **__: object) -> None:
        raise AssertionError("tiktoken was consulted: it downloads its encodings, and this server tokenizes itself")

    monkeypatch.setattr(tiktoken, "get_encoding", no_tiktoken)
    monkeypatch.setattr(tiktoken, "encoding_for_model", no_tiktoken)
    for model, adapter in ((base_model(gateway), ""), (http_adapter, http_adapter)):
        embeddings = OpenAIEmbeddings(
            model=model, base_url=f"{gateway.http_url}/v1", api_key="acme-token",
            check_embedding_ctx_length=False, max_retries=0,
        )
        expected = grpc_vectors(gateway, adapter)
        documents = np.array(embeddings.embed_documents(TEXTS[:2]), dtype=np.float32)
        query = np.array(embeddings.embed_query(TEXTS[2]), dtype=np.float32)
        np.testing.assert_allclose(documents, expected[:2], atol=1e-6)
        np.testing.assert_allclose(query, expected[2], atol=1e-6)


@pytest.fixture(scope="module")
def head_adapters(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two head-only adapters (they share one forward pass per text), the second referred to by its alias."""
    from transformers import AutoModel

    base_fp = fingerprint(AutoModel.from_pretrained(packaged_model_dir()))
    client = Client(gateway.target, "acme-token")
    refs = []
    for k, labels in enumerate((["neg", "pos"], ["a", "b", "c", "d"])):
        torch.manual_seed(10 + k)
        files = head_only_files(torch.randn(len(labels), 384) * 5, torch.randn(len(labels)), labels, base_fp, "test")
        directory = tmp_path_factory.mktemp(f"http-head{k}")
        for name, data in files.items():
            (directory / name).write_bytes(data)
        client.upload_adapter(directory, f"http-head{k}", alias="live")
        refs.append(f"http-head{k}:live" if k else f"http-head{k}")
    return refs


def post_classify(gateway: Gateway, body: object, token: str | None = "acme-token") -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{gateway.http_url}/v1/classify", json=body, headers=headers, timeout=60)


def grpc_classify(gateway: Gateway, **fields: object) -> classifier_pb2.ClassifyResponse:
    client = Client(gateway.target, "acme-token")
    return client.classifier.Classify(classifier_pb2.ClassifyRequest(**fields), metadata=client.metadata, timeout=60)


def assert_same_answer(got: dict[str, object], expected: classifier_pb2.ClassifyResponse) -> None:
    """The JSON mirrors the message field by field: labels, adapters and order exactly, scores to float32 noise."""

    def shape(results: object) -> list[list[str]]:
        return [[r["label"], *(s["label"] for s in r["scores"])] for r in results]  # type: ignore[index, union-attr, attr-defined]

    def scores(results: object) -> list[list[float]]:
        return [[r["score"], *(s["score"] for s in r["scores"])] for r in results]  # type: ignore[index, union-attr, attr-defined]

    def as_json(results: object) -> list[dict[str, object]]:
        return [{"label": r.label, "score": r.score, "scores": [{"label": s.label, "score": s.score} for s in r.scores]}
                for r in results]  # type: ignore[attr-defined]

    assert set(got) == {"results", "adapter", "by_adapter"} and got["adapter"] == expected.adapter
    pairs = [(got["results"], as_json(expected.results))]
    assert [a["adapter"] for a in got["by_adapter"]] == [a.adapter for a in expected.by_adapter]  # type: ignore[index, union-attr]
    pairs += [(a["results"], as_json(e.results)) for a, e in zip(got["by_adapter"], expected.by_adapter)]  # type: ignore[index, arg-type]
    for mine, theirs in pairs:
        assert shape(mine) == shape(theirs)
        np.testing.assert_allclose(np.array(scores(mine)), np.array(scores(theirs)), atol=1e-5)


def test_classify_over_http_answers_as_grpc_classify_with_one_and_several_adapters(
    gateway: Gateway, http_adapter: str, head_adapters: list[str]
) -> None:
    texts = [*TEXTS, "a fourth text, a little longer than the others are"]
    one = post_classify(gateway, {"texts": texts, "adapter": head_adapters[1], "top_k": 2})
    assert one.status_code == 200, one.text
    expected = grpc_classify(gateway, texts=texts, adapter=head_adapters[1], top_k=2)
    assert_same_answer(one.json(), expected)
    assert len(one.json()["results"]) == len(texts) and all(len(r["scores"]) == 2 for r in one.json()["results"])
    assert one.json()["adapter"] == "acme/http-head1@v1" and not one.json()["by_adapter"]
    several = [*head_adapters, http_adapter]  # two head-only adapters sharing a forward, and a LoRA one
    together = post_classify(gateway, {"texts": texts, "adapters": several, "truncate": True})
    assert together.status_code == 200, together.text
    assert_same_answer(together.json(), grpc_classify(gateway, texts=texts, adapters=several, truncate=True))
    assert [len(a["results"][0]["scores"]) for a in together.json()["by_adapter"]] == [2, 4, 2]
    assert not together.json()["results"] and together.json()["adapter"] == ""
    unsure = post_classify(gateway, {"texts": texts, "adapter": head_adapters[1], "abstain_below": 1.0, "abstain_label": "unsure"})
    assert [(r["label"], r["abstained"]) for r in unsure.json()["results"]] == [("unsure", True)] * len(texts)
    ids = [m.id for m in openai_client(gateway).models.list().data]  # every adapter and alias is a `model`
    assert {"http-head0@v1", "http-head0:live", "http-head1@v1", "http-head1:live"} <= set(ids)
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as response:
        assert 'method="Classify",protocol="http"' in response.read().decode()


def test_classify_errors_have_their_http_status(gateway: Gateway, head_adapters: list[str]) -> None:
    def status(body: object, token: str | None = "acme-token") -> tuple[int, str]:
        response = post_classify(gateway, body, token)
        return response.status_code, response.json()["error"]["code"]

    good = {"texts": TEXTS, "adapter": head_adapters[0]}
    assert status({"texts": TEXTS, "adapter": "no-such-adapter"}) == (404, "NOT_FOUND")
    assert status(good, "globex-token") == (404, "NOT_FOUND")  # another tenant's adapter reads as missing
    assert status(good, None) == (401, "UNAUTHENTICATED")
    assert status(good, "nope") == (401, "UNAUTHENTICATED")
    for bad in (
        {"adapter": head_adapters[0]},  # no texts
        {"texts": "one text", "adapter": head_adapters[0]},  # texts is a list, as in the proto
        {**good, "top_k": -1},
        {**good, "abstain_below": 1.5},
        {**good, "adapter_name": "x"},  # a misspelt field is refused, not ignored
        {**good, "adapters": head_adapters},  # adapter and adapters both
        {"texts": [], "adapter": head_adapters[0]},
    ):
        assert status(bad) == (400, "INVALID_ARGUMENT"), bad
    malformed = httpx.post(f"{gateway.http_url}/v1/classify", content=b"{not json", timeout=60,
                           headers={"Authorization": "Bearer acme-token", "Content-Type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "INVALID_ARGUMENT"
