"""Embed, Classify, adapters, auth and bad input against the real gateway over gRPC."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from adaptgate.client import Client
from adaptgate.engine.model import packaged_model_dir
from adaptgate.server import SERVICE_NAMES
from adaptgate.v1 import adapters_pb2, classifier_pb2, embeddings_pb2
from tests.integration.conftest import Gateway, auth
from tests.unit.peft_adapters import make_peft_adapter

pytestmark = pytest.mark.integration
SMS = Path(__file__).resolve().parents[2] / "examples" / "data" / "sms_spam"


def sms_texts(n: int) -> list[str]:
    return [json.loads(line)["text"] for line in (SMS / "test.jsonl").read_text().splitlines()[:n]]


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_health_and_reflection_list_every_service(gateway: Gateway) -> None:
    with gateway.channel() as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request])))
        listed = {s.name for s in response.list_services_response.service}
    assert set(SERVICE_NAMES) | {"grpc.health.v1.Health"} <= listed


def test_embed_matches_sentence_transformers(gateway: Gateway) -> None:
    from sentence_transformers import SentenceTransformer

    texts = sms_texts(64)
    client = Client(gateway.target, "acme-token")
    ours = np.array([e.values for e in client.embed(texts).embeddings])
    reference = SentenceTransformer(str(packaged_model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    cosine = (ours * reference).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert ours.shape == (64, 384)
    assert cosine.min() >= 0.99, f"min cosine {cosine.min():.5f}"


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (embeddings_pb2.EmbedRequest(texts=[]), "texts is empty"),
        (embeddings_pb2.EmbedRequest(texts=["ok", "   "]), "texts[1] is empty"),
        (embeddings_pb2.EmbedRequest(texts=["x"] * 301), "limit is 300"),
        (embeddings_pb2.EmbedRequest(texts=["word " * 1000]), "over the limit of 256"),
        (embeddings_pb2.EmbedRequest(texts=["word " * 20000]), "characters"),
        (embeddings_pb2.EmbedRequest(texts=["ok"], adapter="   "), "adapter is empty"),
    ],
)
def test_bad_embed_requests_are_invalid_argument(gateway: Gateway, request_, words: str) -> None:
    with gateway.channel() as channel, pytest.raises(grpc.RpcError) as info:
        Client(gateway.target, "acme-token").embeddings.Embed(request_, metadata=auth("acme-token"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()


def test_truncate_accepts_overlong_text(gateway: Gateway) -> None:
    response = Client(gateway.target, "acme-token").embed(["word " * 2000], truncate=True)
    assert response.embeddings[0].tokens == 256


def test_every_method_needs_a_token(gateway: Gateway) -> None:
    """Enumerated from the descriptors, so a new method cannot slip through unauthenticated."""
    from adaptgate.v1 import adapters_pb2, classifier_pb2, datasets_pb2, embeddings_pb2, finetune_pb2

    with gateway.channel() as channel:
        for module in (embeddings_pb2, classifier_pb2, adapters_pb2, datasets_pb2, finetune_pb2):
            for service in module.DESCRIPTOR.services_by_name.values():
                for method in service.methods:
                    path = f"/{service.full_name}/{method.name}"
                    request = module.__dict__[method.input_type.name]() if method.input_type.name in module.__dict__ else None
                    codec = dict(request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)
                    if method.client_streaming and method.server_streaming:
                        call = channel.stream_stream(path, **codec)
                        code = code_of(lambda: list(call(iter([request]), metadata=auth("nope"))))
                    elif method.client_streaming:
                        call = channel.stream_unary(path, **codec)
                        code = code_of(lambda: call(iter([request]), metadata=auth("nope")))
                    elif method.server_streaming:
                        call = channel.unary_stream(path, **codec)
                        code = code_of(lambda: list(call(request, metadata=auth("nope"))))
                    else:
                        call = channel.unary_unary(path, **codec)
                        code = code_of(lambda: call(request))
                    assert code == grpc.StatusCode.UNAUTHENTICATED, path


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("minilm-adapter")
    model = make_peft_adapter(packaged_model_dir(), out, num_labels=3, rank=8, seed=7)
    return out, model


def test_uploaded_peft_adapter_serves_peft_probabilities(gateway: Gateway, peft_adapter) -> None:
    directory, peft_model = peft_adapter
    client = Client(gateway.target, "acme-token")
    uploaded = client.upload_adapter(directory, "topics", alias="prod")
    assert uploaded.ref == "acme/topics@v1" and uploaded.rank == 8 and list(uploaded.aliases) == ["prod"]
    texts = sms_texts(16)
    served = client.classify(texts, "topics:prod")
    assert served.adapter == "acme/topics@v1"
    ours = np.array([[s.score for s in sorted(r.scores, key=lambda s: s.label)] for r in served.results])
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(packaged_model_dir())
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        expected = torch.softmax(peft_model(**batch).logits, dim=-1).numpy()
    np.testing.assert_allclose(ours, expected, atol=0.03)
    assert [r.label for r in served.results] == [f"class-{i}" for i in expected.argmax(axis=1)]


def test_another_tenant_and_unknown_adapter_are_the_same_not_found(gateway: Gateway, peft_adapter) -> None:
    Client(gateway.target, "acme-token").upload_adapter(peft_adapter[0], "private")
    globex = Client(gateway.target, "globex-token")
    for ref in ("acme/private", "acme/does-not-exist", "private"):
        with pytest.raises(grpc.RpcError) as info:
            globex.classify(["hello"], ref)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details().endswith("not found")
    admin = Client(gateway.target, "admin-token")
    assert admin.classify(["hello"], "acme/private").adapter == "acme/private@v1"


def test_corrupt_version_is_refused_and_the_alias_stays(gateway: Gateway, peft_adapter, tmp_path: Path) -> None:
    client = Client(gateway.target, "acme-token")
    client.upload_adapter(peft_adapter[0], "swap", alias="prod")
    for name in ("adapter_config.json", "labels.json"):
        (tmp_path / name).write_bytes((peft_adapter[0] / name).read_bytes())
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(grpc.RpcError) as info:
        client.upload_adapter(tmp_path, "swap", alias="prod")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "safetensors" in info.value.details()
    assert client.classify(["still serving"], "swap:prod").adapter == "acme/swap@v1"
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(grpc.RpcError) as info:
        client.upload_adapter(tmp_path, "swap")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "pickle" in info.value.details()


def test_alias_flip_and_load_unload(gateway: Gateway, peft_adapter) -> None:
    client = Client(gateway.target, "acme-token")
    first = client.upload_adapter(peft_adapter[0], "flip", alias="prod")
    second = client.upload_adapter(peft_adapter[0], "flip")
    md = client.metadata
    client.adapters.SetAlias(adapters_pb2.SetAliasRequest(ref=second.ref, alias="prod"), metadata=md)
    assert client.classify(["x"], "flip:prod").adapter == second.ref
    client.adapters.SetAlias(adapters_pb2.SetAliasRequest(ref=first.ref, alias="prod"), metadata=md)
    assert client.classify(["x"], "flip:prod").adapter == first.ref
    pin = adapters_pb2.LoadAdapterRequest(ref=second.ref, pin=True)
    assert code_of(lambda: client.adapters.LoadAdapter(pin, metadata=md)) == grpc.StatusCode.PERMISSION_DENIED
    loaded = client.adapters.LoadAdapter(pin, metadata=auth("admin-token"))
    assert loaded.loaded and loaded.pinned
    unload = adapters_pb2.AdapterRef(ref=second.ref)
    assert code_of(lambda: client.adapters.UnloadAdapter(unload, metadata=md)) == grpc.StatusCode.PERMISSION_DENIED
    assert client.adapters.GetAdapter(unload, metadata=md).pinned  # a tenant cannot undo an admin's pin
    unloaded = client.adapters.UnloadAdapter(unload, metadata=auth("admin-token"))
    assert not unloaded.loaded and not unloaded.pinned
    listed = client.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(), metadata=md).adapters
    assert {a.ref for a in listed} >= {first.ref, second.ref}
    with pytest.raises(grpc.RpcError) as info:
        client.adapters.ListAdapters(adapters_pb2.ListAdaptersRequest(tenant="globex"), metadata=md)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_metrics_show_the_requests(gateway: Gateway) -> None:
    Client(gateway.target, "acme-token").embed(["count me"])
    body = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    ok = [l for l in body.splitlines() if l.startswith('adaptgate_requests_total{code="OK",method="Embed",protocol="grpc"}')]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert "adaptgate_request_duration_seconds_bucket" in body
    assert "adaptgate_batch_size_bucket" in body and "adaptgate_queue_depth" in body
    assert 'adaptgate_requests_total{code="INVALID_ARGUMENT",method="Embed",protocol="grpc"}' in body


def test_lora_only_adapter_tunes_embeddings_but_cannot_classify(gateway: Gateway, peft_adapter, tmp_path: Path) -> None:
    from safetensors.torch import load, save

    source = peft_adapter[0]
    tensors = load((source / "adapter_model.safetensors").read_bytes())
    lora_only = {k: v for k, v in tensors.items() if ".lora_" in k}
    (tmp_path / "adapter_model.safetensors").write_bytes(save(lora_only))
    (tmp_path / "adapter_config.json").write_bytes((source / "adapter_config.json").read_bytes())
    client = Client(gateway.target, "acme-token")
    uploaded = client.upload_adapter(tmp_path, "tuned-embeddings")
    assert uploaded.rank == 8 and not uploaded.labels
    texts = ["a tenant-tuned embedding", "of two texts"]
    tuned = np.array([e.values for e in client.embed(texts, adapter=uploaded.ref).embeddings])
    plain = np.array([e.values for e in client.embed(texts).embeddings])
    assert tuned.shape == plain.shape and not np.allclose(tuned, plain, atol=1e-2)
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-3)
    with pytest.raises(grpc.RpcError) as info:
        client.classify(texts, uploaded.ref)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no task head" in info.value.details()


def test_several_adapters_on_the_same_texts_answer_as_each_alone(gateway: Gateway, peft_adapter, tmp_path: Path) -> None:
    """Head-only adapters share one forward per text; a LoRA adapter rides in the same call with its own rows."""
    from adaptgate.adapters.format import head_only_files
    from adaptgate.engine.model import fingerprint
    from transformers import AutoModel

    base_fp = fingerprint(AutoModel.from_pretrained(packaged_model_dir()))
    client = Client(gateway.target, "acme-token")
    refs = []
    for k, labels in enumerate((["neg", "pos"], ["a", "b", "c", "d"])):
        torch.manual_seed(k)
        files = head_only_files(torch.randn(len(labels), 384) * 5, torch.randn(len(labels)), labels, base_fp, "test")
        directory = tmp_path / f"head{k}"
        directory.mkdir()
        for name, data in files.items():
            (directory / name).write_bytes(data)
        refs.append(client.upload_adapter(directory, f"head{k}").ref)
    refs.append(client.upload_adapter(peft_adapter[0], "multi-lora").ref)
    texts = sms_texts(8)
    request = classifier_pb2.ClassifyRequest(texts=texts, adapters=refs)
    together = client.classifier.Classify(request, metadata=client.metadata)
    assert [a.adapter for a in together.by_adapter] == refs and not together.results
    for ref, answers in zip(refs, together.by_adapter):
        alone = client.classify(texts, ref)
        np.testing.assert_allclose(
            np.array([[s.score for s in r.scores] for r in answers.results]),
            np.array([[s.score for s in r.scores] for r in alone.results]),
            atol=0.02,
        )
        assert [r.label for r in answers.results] == [r.label for r in alone.results]
    both = classifier_pb2.ClassifyRequest(texts=texts, adapter=refs[0], adapters=refs)
    assert code_of(lambda: client.classifier.Classify(both, metadata=client.metadata)) == grpc.StatusCode.INVALID_ARGUMENT


def test_packed_float32_embeddings_equal_the_float_list(gateway: Gateway) -> None:
    client = Client(gateway.target, "acme-token")
    texts = sms_texts(5)
    packed = client.embed_array(texts)
    listed = np.array([e.values for e in client.embed(texts).embeddings], dtype=np.float32)
    assert packed.shape == (5, 384) and packed.dtype == np.float32
    np.testing.assert_array_equal(packed, listed)


def test_embed_names_the_model(gateway: Gateway) -> None:
    assert Client(gateway.target, "acme-token").embed(["which model?"]).model == "all-MiniLM-L6-v2"


def test_embed_stream_answers_every_chunk_in_order_like_embed(gateway: Gateway) -> None:
    client = Client(gateway.target, "acme-token")
    texts = [json.loads(line)["text"] for line in (SMS / "test.jsonl").read_text().splitlines()[:200]]
    chunks = [texts[i : i + 16] for i in range(0, len(texts), 16)]
    streamed = list(client.embed_stream(iter(chunks), truncate=True))
    assert [len(a) for a in streamed] == [len(c) for c in chunks]
    for chunk, array in zip(chunks[:3], streamed[:3]):
        np.testing.assert_allclose(array, client.embed_array(chunk, truncate=True), atol=1e-2)
    requests = [embeddings_pb2.EmbedRequest(texts=c) for c in (["a", "b"], ["c"])]
    indexes = [r.chunk for r in client.embeddings.EmbedStream(iter(requests), metadata=auth("acme-token"))]
    assert indexes == [0, 1]


def test_embed_stream_ends_with_the_status_of_a_bad_chunk(gateway: Gateway) -> None:
    client = Client(gateway.target, "acme-token")
    requests = [embeddings_pb2.EmbedRequest(texts=["fine"]), embeddings_pb2.EmbedRequest(texts=[]),
                embeddings_pb2.EmbedRequest(texts=["never answered"])]
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in client.embeddings.EmbedStream(iter(requests), metadata=auth("acme-token")):
            received.append(response.chunk)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert received in ([], [0])  # chunks before the bad one may already have been answered
    assert client.embed(["still serving"]).embeddings


def test_cli_embed_streams_a_file_into_an_npy_in_order(gateway: Gateway, tmp_path: Path) -> None:
    from adaptgate.cli import main

    texts = [json.loads(line)["text"] for line in (SMS / "test.jsonl").read_text().splitlines()[:300]]
    source, output = tmp_path / "texts.jsonl", tmp_path / "vectors.npy"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    main(["embed", "--input", str(source), "--output", str(output), "--chunk-size", "64", "--truncate",
          "--server", gateway.target, "--token", "acme-token"])
    vectors = np.load(output)
    assert vectors.shape == (300, 384)
    expected = Client(gateway.target, "acme-token").embed_array([texts[0], texts[150], texts[299]], truncate=True)
    np.testing.assert_allclose(vectors[[0, 150, 299]], expected, atol=1e-2)
