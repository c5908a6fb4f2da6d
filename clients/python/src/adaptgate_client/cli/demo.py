"""`make demo`: upload SMS spam, train a head on Ray, classify the test split, print accuracy."""

from __future__ import annotations

import json
import time
from pathlib import Path

from adaptgate_client.cli.commands import watch
from adaptgate_client.client import Client
from adaptgate_client.types import JobState

BATCH = 256


def read_jsonl(path: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], [str(r["label"]) for r in rows]


def run_demo(client: Client, data: Path, adapter_name: str) -> None:
    started = time.perf_counter()
    dataset = client.upload_dataset(data / "train.jsonl", name=data.name)
    print(f"uploaded {dataset.id}: {dataset.rows} rows, labels {[(c.label, c.count) for c in dataset.labels]}")
    job = client.submit_job(dataset.id, adapter_name, method="head", alias="prod")
    last = watch(client, job.id)
    if last is None or last.state is not JobState.SUCCEEDED:
        raise SystemExit(f"job {job.id} ended {last.state.name if last else 'without events'}: {last.message if last else ''}")
    print(f"job {job.id} succeeded in {time.perf_counter() - started:.1f}s (from upload)")
    texts, labels = read_jsonl(data / "test.jsonl")
    predicted: list[str] = []
    answered_by = ""
    t0 = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        response = client.classify(texts[start : start + BATCH], f"{adapter_name}:prod", truncate=True)
        predicted += [r.label for r in response.results]
        answered_by = response.adapter
    elapsed = time.perf_counter() - t0
    accuracy = sum(p == y for p, y in zip(predicted, labels)) / len(labels)
    print(f"adapter {answered_by}: accuracy {accuracy:.4f} on {len(labels)} test texts ({len(texts) / elapsed:.0f} texts/s)")
