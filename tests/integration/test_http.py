"""The HTTP API against the real server, through the official `openai` client: the same vectors as
gRPC `Embed`, an adapter selected by `model`, base64 encoding, OpenAI-shaped errors, the same tokens."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import openai
import pytest

from adaptgate.client import Client
from adaptgate.engine.model import packaged_model_dir
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
    assert {"/v1/embeddings", "/v1/models"} <= set(document["paths"])
    request = urllib.request.Request(f"{gateway.http_url}/v1/embeddings", data=b"{not json", method="POST",
                                     headers={"Authorization": "Bearer acme-token", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=10)
    assert malformed.value.code == 400 and json.load(malformed.value)["error"]["code"] == "INVALID_ARGUMENT"
