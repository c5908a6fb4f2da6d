"""A fake runner and publisher for JobManager tests: the Runner protocol without Ray or a model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from adaptgate.training.jobs.records import PublishRequest
from adaptgate.training.methods.head import HeadParams, HeadResult
from adaptgate.training.methods.lora import LoraParams, LoraResult
from adaptgate.training.methods.method import TrainParams, TrainResult
from adaptgate.training.runners.base import OnEvent
from adaptgate.training.runners.updates import make_update

METRICS = {"accuracy": 0.95, "macro_f1": 0.9, "loss": 0.2}
LORA_MODULE = "encoder.layer.1.attention.self.query"


@dataclass
class FakeRunner:
    """Reports like train_head; `gate` holds it mid-training, `error` makes it fail there."""

    gate: asyncio.Event | None = None
    error: Exception | None = None
    calls: list[str] = field(default_factory=list)
    params: list[TrainParams] = field(default_factory=list)
    rows: list[tuple[list[str], list[str]]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    mid_training: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(
        self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: TrainParams, on_event: OnEvent
    ) -> TrainResult:
        self.calls.append(job_id)
        self.params.append(params)
        self.rows.append((texts, labels))
        await on_event(make_update("started", "fake worker started", 0.0))
        await on_event({"kind": "skip"})
        await on_event(make_update("progress", f"embedded {len(texts)}/{len(texts)} texts", 0.8, 1.5))
        self.mid_training.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        names = sorted(set(labels))
        confusion = [[5 if i == j else 1 for j in range(len(names))] for i in range(len(names))]
        details = {"confusion": {"labels": names, "matrix": confusion}}
        await on_event(make_update("eval", "step 25/25", 0.99, 0.0, METRICS, details=details))
        if isinstance(params, LoraParams):
            lora = {LORA_MODULE: (torch.randn(4, 8), torch.randn(8, 4))}
            return LoraResult(
                lora=lora, rank=4, alpha=8.0, weight=torch.randn(len(names), 8), bias=torch.zeros(len(names)), labels=names,
                metrics=dict(METRICS), fingerprint="fp-test", base_prefix="bert", head_input="mean", normalize=False,
                confusion=confusion,
            )
        assert isinstance(params, HeadParams)
        return HeadResult(torch.randn(len(names), 8), torch.zeros(len(names)), names, dict(METRICS), "fp-test", confusion=confusion)

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)

    def discard(self, job_id: str) -> None:
        self.discarded.append(job_id)


@dataclass
class FakePublisher:
    requests: list[PublishRequest] = field(default_factory=list)

    def __call__(self, request: PublishRequest) -> str:
        self.requests.append(request)
        return f"{request.tenant}/{request.adapter_name}@v{len(self.requests)}"
