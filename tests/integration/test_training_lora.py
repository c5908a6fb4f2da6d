"""`lora` and `auto` jobs on real Ray with the packaged model: train → publish → Classify, cancel, divergence.

Kept small for CI (2 CPUs): a 1,000-row slice of SMS spam, at most 64 tokens, a few dozen steps.
Worker-kill resume is covered against RayRunner in tests/unit/training/test_ray_runner.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from adaptgate.client import Client
from adaptgate.v1 import datasets_pb2, finetune_pb2
from tests.integration.conftest import Gateway
from tests.integration.test_training_loop import watch

pytestmark = pytest.mark.integration
SMS = Path(__file__).resolve().parents[2] / "examples" / "data" / "sms_spam"
SLICE_ROWS = 1000


def rows(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (SMS / f"{name}.jsonl").read_text().splitlines()]


def upload_slice(client: Client, name: str, count: int = SLICE_ROWS) -> datasets_pb2.Dataset:
    data = "".join(json.dumps(r) + "\n" for r in rows("train")[:count]).encode()
    chunks = iter([datasets_pb2.UploadDatasetChunk(name=name, format="jsonl", data=data)])
    return client.datasets.UploadDataset(chunks, metadata=client.metadata)


def submit(client: Client, **fields: object) -> finetune_pb2.Job:
    request = finetune_pb2.SubmitJobRequest(**fields)  # type: ignore[arg-type]
    return client.finetune.SubmitJob(request, metadata=client.metadata, timeout=30)


def accuracy(client: Client, adapter: str, split: str = "test") -> tuple[float, str]:
    test = rows(split)
    predicted, served = [], ""
    for start in range(0, len(test), 300):
        response = client.classify([r["text"] for r in test[start : start + 300]], adapter, truncate=True)
        predicted += [r.label for r in response.results]
        served = response.adapter
    return sum(p == r["label"] for p, r in zip(predicted, test)) / len(test), served


def test_lora_job_trains_publishes_and_serves(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    dataset = upload_slice(acme, "sms-lora")
    began = time.monotonic()
    job = submit(acme, dataset_id=dataset.id, adapter_name="sms-lora", method="lora", alias="prod",
                 max_steps=40, max_tokens=64, seed=1)
    assert job.method == "lora" and not job.auto
    events = list(watch(acme, job.id))
    took = time.monotonic() - began
    assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    messages = [e.message for e in events]
    assert any("LoRA r=16 on 24 linear layers of blocks 2-5 (blocks 0-1 frozen" in m for m in messages)
    evals = [e for e in events if e.kind == "eval"]
    assert len(evals) >= 3 and all(0 < e.metrics.accuracy <= 1 for e in evals)
    assert any(e.kind == "progress" and 0 < e.progress < 1 and e.eta_seconds > 0 for e in events)
    final = events[-1]
    assert "confusion (rows true, columns predicted) [ham:" in final.message
    assert list(final.details.confusion.labels) == ["ham", "spam"]
    assert 90 <= sum(sum(row.counts) for row in final.details.confusion.rows) <= 110  # the validation split (~10%)

    done = acme.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata)
    assert done.adapter == "acme/sms-lora@v1" and done.metrics.accuracy >= 0.9
    assert list(done.details.confusion.labels) == ["ham", "spam"]
    score, served = accuracy(acme, "sms-lora:prod")
    assert served == "acme/sms-lora@v1"
    assert score >= 0.95, score  # 1,132 held-out test messages; a frozen-embedding head gets ~0.98 on all 4,442 rows
    print(f"lora on {SLICE_ROWS} SMS rows, 40 steps: test accuracy {score:.4f}, SubmitJob to SUCCEEDED {took:.1f} s")


def test_auto_chooses_lora_and_reports_its_block_table(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    dataset = upload_slice(acme, "sms-auto", 1200)
    job = submit(acme, dataset_id=dataset.id, adapter_name="sms-auto", method="auto", max_steps=20, seed=2)
    assert job.method == "lora" and job.auto
    assert job.details.method.chosen == "lora" and "HTSR" in job.details.method.reason
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    assert any("method 'auto' chose 'lora' for 1200 rows and 2 labels" in e.message for e in events)
    tables = [e for e in events if len(e.details.blocks)]
    assert tables, [e.message for e in events]
    blocks = tables[0].details.blocks
    assert [b.block for b in blocks] == [2, 3, 4, 5]
    assert all(0.5 <= b.multiplier <= 1.5 and b.alpha > 1 and b.learning_rate > 0 for b in blocks)


def test_cancelled_lora_job_publishes_nothing(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    dataset = upload_slice(acme, "sms-lora-cancel")
    job = submit(acme, dataset_id=dataset.id, adapter_name="lora-never", method="lora", epochs=50)
    stream = watch(acme, job.id)
    for event in stream:
        if event.kind == "progress":
            break  # training is under way
    stream.cancel()
    began = time.monotonic()
    acme.finetune.CancelJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata)
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.CANCELLED and time.monotonic() - began < 15
    with pytest.raises(grpc.RpcError) as info:
        acme.classify(["hello"], "lora-never")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_diverging_lora_job_fails_with_a_clear_reason(gateway: Gateway) -> None:
    acme = Client(gateway.target, "acme-token")
    dataset = upload_slice(acme, "sms-lora-nan", 400)
    job = submit(acme, dataset_id=dataset.id, adapter_name="lora-diverged", method="lora", learning_rate=10.0, max_steps=60)
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.FAILED, events[-1].message
    done = acme.finetune.GetJob(finetune_pb2.JobRef(id=job.id), metadata=acme.metadata)
    assert done.error.startswith("training diverged:") and "try a lower learning_rate" in done.error, done.error
    with pytest.raises(grpc.RpcError) as info:
        acme.classify(["hello"], "lora-diverged")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_embed_job_publishes_a_lora_only_adapter_that_embed_uses(gateway: Gateway) -> None:
    import numpy as np

    acme = Client(gateway.target, "acme-token")
    dataset = upload_slice(acme, "sms-embed", 300)
    job = submit(acme, dataset_id=dataset.id, adapter_name="sms-embed", method="embed", max_steps=10, seed=4)
    events = list(watch(acme, job.id))
    assert events[-1].state == finetune_pb2.SUCCEEDED, events[-1].message
    assert "contrastive LoRA embeddings" in " ".join(e.message for e in events)
    assert list(events[-1].details.confusion.labels) == ["ham", "spam"]
    texts = ["WINNER!! claim your prize now", "see you at lunch"]
    tuned = acme.embed_array(texts, adapter="sms-embed")
    plain = acme.embed_array(texts)
    assert tuned.shape == plain.shape == (2, 384)
    assert np.allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-3) and not np.allclose(tuned, plain, atol=1e-3)
    with pytest.raises(grpc.RpcError) as info:
        acme.classify(texts, "sms-embed")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_limits_a_job_cannot_meet_are_refused_at_submit(gateway: Gateway) -> None:
    """A rank publishing would refuse (max_lora_rank, 16 by default) or a time limit above the server's
    (max_job_seconds, 6 h) is INVALID_ARGUMENT at SubmitJob, before any training."""
    acme = Client(gateway.target, "acme-token")
    dataset = upload_slice(acme, "sms-limits", 100)
    for fields, words in (({"lora_rank": 32}, "16 (this server's max_lora_rank); got 32"),
                          ({"max_seconds": 6 * 3600 + 1}, "max_seconds must be between 0 (this server's limit, 21600 s)")):
        with pytest.raises(grpc.RpcError) as info:
            submit(acme, dataset_id=dataset.id, adapter_name="never-trained", method="lora", **fields)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
    listed = acme.finetune.ListJobs(finetune_pb2.ListJobsRequest(), metadata=acme.metadata).jobs
    assert "never-trained" not in {j.adapter_name for j in listed}
