"""The whole loop on real Ray: upload → head job → watch → classify with the new adapter → tenancy → metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from adaptgate.client import Client
from adaptgate.v1 import classifier_pb2, datasets_pb2, finetune_pb2
from tests.integration.conftest import Gateway, running_gateway

pytestmark = pytest.mark.integration
SMS = Path(__file__).resolve().parents[2] / "examples" / "data" / "sms_spam"
WATCH_TIMEOUT_S = 300  # a job that hangs fails its test (DEADLINE_EXCEEDED) instead of hanging the suite


def watch(client: Client, job_id: str, timeout: float = WATCH_TIMEOUT_S) -> Any:
    """WatchJob with a deadline; iterate it for the events, `.cancel()` it to stop early."""
    return client.finetune.WatchJob(finetune_pb2.JobRef(id=job_id), metadata=client.metadata, timeout=timeout)


def read_split(name: str) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (SMS / f"{name}.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def upload_bytes(client: Client, name: str, fmt: str, data: bytes) -> datasets_pb2.Dataset:
    chunks = iter([datasets_pb2.UploadDatasetChunk(name=name, format=fmt, data=data)])
    return client.datasets.UploadDataset(chunks, metadata=client.metadata)


def test_head_job_trains_publishes_and_serves(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    dataset = acme.upload_dataset(SMS / "train.jsonl", name="sms")
    assert dataset.rows == 4442 and {(l.label, l.count) for l in dataset.labels} == {("ham", 3839), ("spam", 603)}

    job = acme.submit_job(dataset.id, "sms-spam", method="head", alias="prod")
    assert job.state == finetune_pb2.QUEUED
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert any(e.kind == "progress" and 0 < e.progress < 1 for e in events)
    assert any(e.kind == "eval" and e.metrics.accuracy > 0.9 for e in events)

    done = acme.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata)
    assert done.adapter == "acme/sms-spam@v1" and done.progress == pytest.approx(1.0)

    texts, labels = read_split("test")
    predicted = []
    for start in range(0, len(texts), 300):
        response = acme.classify(texts[start : start + 300], "sms-spam:prod", truncate=True)
        assert response.adapter == "acme/sms-spam@v1"
        predicted += [r.label for r in response.results]
    accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    assert accuracy >= 0.95, accuracy

    globex = Client(gateway.target, "globex-token")
    for call in (
        lambda: globex.classify(["win a prize"], "acme/sms-spam:prod"),
        lambda: globex.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=globex.metadata),
        lambda: globex.datasets.GetDataset(datasets_pb2.DatasetRef(id=dataset.id), metadata=globex.metadata),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert job.id not in {j.id for j in globex.finetune.ListJobs(finetune_pb2.ListJobsRequest(), metadata=globex.metadata).jobs}

    body = urllib.request.urlopen(gateway.metrics_url, timeout=10).read().decode()
    assert 'adaptgate_jobs{state="SUCCEEDED"}' in body
    classify_ok = [l for l in body.splitlines() if l.startswith('adaptgate_requests_total{code="OK",method="Classify",protocol="grpc"}')]
    assert classify_ok and float(classify_ok[0].split()[-1]) >= 4


def test_a_job_validates_on_the_validation_dataset_it_names(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    texts, labels = read_split("train")
    held_texts, held_labels = read_split("test")
    train = upload_bytes(acme, "sms-train", "jsonl", "".join(
        json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts[:600], labels[:600])).encode())
    held = upload_bytes(acme, "sms-held", "jsonl", "".join(
        json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(held_texts[:150], held_labels[:150])).encode())
    job = acme.finetune.SubmitJob(finetune_pb2.SubmitJobRequest(
        dataset_id=train.id, adapter_name="sms-held-out", method="head", validation_dataset_id=held.id), metadata=acme.metadata)
    assert job.validation_dataset_id == held.id
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    done = acme.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata)
    assert sum(sum(row.counts) for row in done.details.confusion.rows) == held.rows  # scored on exactly those rows
    with pytest.raises(grpc.RpcError) as info:  # a label the training set lacks
        odd = upload_bytes(acme, "sms-odd", "jsonl", b"".join(
            json.dumps({"text": f"text {i}", "label": y}).encode() + b"\n" for i, y in enumerate(["ham", "ham", "odd", "odd"])))
        acme.finetune.SubmitJob(finetune_pb2.SubmitJobRequest(
            dataset_id=train.id, adapter_name="sms-odd", method="head", validation_dataset_id=odd.id), metadata=acme.metadata)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'odd'" in info.value.details()


def test_a_job_with_an_out_of_scope_label_publishes_an_adapter_that_abstains(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    texts, labels = read_split("train")
    cities = ["Lisbon", "Oslo", "Lima", "Perth", "Quito", "Riga", "Dakar", "Hanoi"]
    outside = [f"weather in {c}: {k} degrees and {w} tomorrow" for c in cities for k in (3, 17, 29)
               for w in ("rain", "sun", "fog")]
    rows = [{"text": t, "label": y} for t, y in zip(texts[:600], labels[:600])] + [{"text": t, "label": "none"} for t in outside]
    dataset = upload_bytes(acme, "sms-scoped", "jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    job = acme.finetune.SubmitJob(finetune_pb2.SubmitJobRequest(
        dataset_id=dataset.id, adapter_name="sms-scoped", method="auto", out_of_scope_label="none"), metadata=acme.metadata)
    assert job.method == "head" and job.out_of_scope_label == "none"
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    metrics = acme.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata).metrics
    assert metrics.in_scope_accuracy > 0.8 and 0 < metrics.abstain_threshold < 1 and metrics.out_of_scope_recall > 0.5

    def classify(**kw: object) -> Any:
        request = classifier_pb2.ClassifyRequest(texts=["weather in Bergen: 8 degrees and rain tomorrow", texts[0]],
                                                 adapter="sms-scoped", truncate=True, **kw)
        return acme.classifier.Classify(request, metadata=acme.metadata).results

    weather, sms = classify()
    assert (weather.label, weather.abstained) == ("none", True)
    assert not sms.abstained and sms.label == labels[0]
    # a request's own threshold and label win over the adapter's
    assert [(r.label, r.abstained) for r in classify(abstain_below=1.0, abstain_label="unsure")] == [("unsure", True)] * 2
    with pytest.raises(grpc.RpcError) as info:
        classify(abstain_below=1.5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "abstain_below" in info.value.details()


def test_a_thousand_label_head_trains_and_serves_beside_two_label_heads(gateway: Gateway) -> None:
    """An intent catalogue of 1,000 classes works with the default settings and shares a request
    (and the engine's batches) with a 2-label head."""
    texts, labels = read_split("train")
    rows = [{"text": t, "label": f"intent-{i % 1000:04d}"} for i, t in enumerate(dict.fromkeys(texts))]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    acme = Client(gateway.target, "acme-token")
    many = upload_bytes(acme, "intents", "jsonl", data)
    assert len(many.labels) == 1000
    two = upload_bytes(acme, "sms-two", "jsonl", "".join(
        json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts[:400], labels[:400])).encode())
    jobs = [acme.submit_job(many.id, "intents", method="head"), acme.submit_job(two.id, "sms-two", method="head")]
    for job in jobs:
        events = list(watch(acme, job.id))
        assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    response = acme.classifier.Classify(
        classifier_pb2.ClassifyRequest(texts=texts[:8], adapters=["intents", "sms-two"], top_k=3, truncate=True),
        metadata=acme.metadata,
    )
    intents, spam = response.by_adapter
    assert intents.adapter == "acme/intents@v1" and spam.adapter == "acme/sms-two@v1"
    assert all(r.label.startswith("intent-") and len(r.scores) == 3 for r in intents.results)
    assert all(r.label in {"ham", "spam"} for r in spam.results)


@pytest.mark.parametrize(
    ("fmt", "data", "words"),
    [
        ("jsonl", b'{"text": "a", "label": "x"}\n{not json}\n', "line 2"),
        ("jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n{"text": "c", "label": "x"}\n{"text": "d", "label": "x"}\n', "class"),
        ("jsonl", b'{"body": "a", "label": "x"}\n', "text"),
        ("xlsx", b"PAR1", "format"),
        ("parquet", b"PAR1", "not a Parquet file"),
        ("jsonl", b"", "empty"),
    ],
)
def test_malformed_datasets_are_rejected_with_the_reason(gateway: Gateway, fmt: str, data: bytes, words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        upload_bytes(Client(gateway.target, "acme-token"), "bad", fmt, data)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()


def test_a_parquet_upload_holds_the_same_rows_as_its_jsonl(gateway: Gateway) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = read_split("train")
    out = pa.BufferOutputStream()
    pq.write_table(pa.table({"message": texts, "category": labels}), out, row_group_size=1000)
    acme = Client(gateway.target, "acme-token")
    chunks = iter([datasets_pb2.UploadDatasetChunk(
        name="sms-parquet", format="parquet", text_field="message", label_field="category", data=out.getvalue().to_pybytes())])
    dataset = acme.datasets.UploadDataset(chunks, metadata=acme.metadata)
    assert dataset.rows == 4442 and {(l.label, l.count) for l in dataset.labels} == {("ham", 3839), ("spam", 603)}


def test_a_few_conflicting_labels_are_resolved_and_reported(gateway: Gateway) -> None:
    texts, labels = read_split("train")
    i = next(i for i, t in enumerate(texts) if texts.count(t) == 1)
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels)] + [{"text": texts[i], "label": "spam" if labels[i] == "ham" else "ham"}]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    dataset = upload_bytes(Client(gateway.target, "acme-token"), "sms-noisy", "jsonl", data)
    assert any("different labels" in w and "1 tie" in w for w in dataset.warnings), dataset.warnings
    assert dataset.rows == len(rows) - 2  # the tie is dropped whole


def test_cancelled_job_publishes_nothing(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    dataset = acme.upload_dataset(SMS / "train.jsonl", name="sms-cancel")
    job = acme.submit_job(dataset.id, "never-published", method="head")
    cancelled = acme.finetune.CancelJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata, timeout=30)
    assert cancelled.state == finetune_pb2.CANCELLED  # CancelJob waits for the job to stop (a head job takes ~20 s)
    events = list(watch(acme, job.id))
    assert (events[-1].kind, events[-1].state) == ("state", finetune_pb2.CANCELLED)
    with pytest.raises(grpc.RpcError) as info:
        acme.classify(["hello"], "never-published")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_unknown_dataset_and_method_are_clear_errors(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    with pytest.raises(grpc.RpcError) as info:
        acme.submit_job("ds-doesnotexist", "x", method="head")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _ray_processes(pid: int) -> list[str]:
    """Names of the gateway's Ray descendants (gcs_server, raylet, agents, workers)."""
    import psutil

    names = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            names.append(" ".join(child.cmdline()[:2]))
        except psutil.NoSuchProcess:
            continue
    return [n for n in names if "ray" in n]


def test_a_local_ray_starts_with_the_first_job_not_with_the_gateway(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Serving-only replicas pay nothing for Ray; the first job still runs on a real local Ray."""
    with running_gateway(tmp_path / "data", "--base-model", str(tiny_bert_dir)) as gateway:
        acme = Client(gateway.target, "acme-token")
        assert len(acme.embed(["serving needs no Ray"]).embeddings) == 1
        assert _ray_processes(gateway.process.pid) == []
        rows = (SMS / "train.jsonl").read_text().splitlines()[:200]
        dataset = upload_bytes(acme, "sms-small", "jsonl", "\n".join(rows).encode())
        job = acme.submit_job(dataset.id, "first-job", method="head")
        events = list(watch(acme, job.id))
        assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
        assert any("Ray worker pid" in e.message for e in events)
        assert any("raylet" in name for name in _ray_processes(gateway.process.pid))
