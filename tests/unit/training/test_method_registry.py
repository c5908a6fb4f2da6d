"""The method registry: every registered method takes one path (checked at submit, parameters from the job
record, trained through the worker's entry, published as an adapter the store accepts), a method added to the
registry is offered at once, unknown names are INVALID_ARGUMENT naming the registered ones, and the CLI asks
for the server's default method."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.model import load_base_model
from adaptgate.errors import InvalidArgument
from adaptgate.training.data.datasets import DatasetStore
from adaptgate.training.data.splits import job_split
from adaptgate.training.db.database import Database
from adaptgate.training.jobs.limits import JobLimits
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.jobs.records import JobSpec, JobState
from adaptgate.training.methods.head import HeadResult, head_files, label_order
from adaptgate.training.methods.head_embed import embed_texts
from adaptgate.training.methods.method import Context, Method
from adaptgate.training.methods.registry import METHODS, method_of
from adaptgate.training.methods.train import train
from adaptgate.training.runners.base import OnEvent
from adaptgate.training.runners.updates import Report, make_update
from adaptgate.training.runners.worker_base import load_training_base
from adaptgate.training.tracking import TrackingSpec

from .conftest import jsonl, separable_rows
from .fakes import FakePublisher
from .test_job_manager import events_of


@dataclass
class InlineRunner:
    """The Runner protocol running the Ray worker's own entry (`methods.train.train`) in a thread: real
    training on the tiny model, without Ray; a resumable method gets a checkpoint directory as on Ray."""

    checkpoints: Path
    params: list[Any] = field(default_factory=list)

    async def run(self, job_id: str, texts: list[str], labels: list[str], model_dir: str, params: Any, on_event: OnEvent) -> Any:
        if method_of(params).resumable:
            params = dataclasses.replace(params, checkpoint_dir=str(self.checkpoints / job_id))
        self.params.append(params)
        loop = asyncio.get_running_loop()

        def report(update: dict[str, Any]) -> None:
            asyncio.run_coroutine_threadsafe(on_event(update), loop).result()

        return await asyncio.to_thread(train, texts, labels, model_dir, params, report)

    def cancel(self, job_id: str) -> None:
        pass

    def discard(self, job_id: str) -> None:
        pass


# ----- an example method, added the way a new one would be: one module's worth and one registry entry -----


@dataclass(frozen=True)
class CentroidParams:
    """Nearest class centroid on frozen embeddings: no optimisation at all."""

    validation_fraction: float = 0.1
    seed: int = 0
    holdout_from: int = 0
    base_fingerprint: str = ""
    tracking: TrackingSpec | None = None


def centroid_params(spec: JobSpec, context: Context) -> CentroidParams:
    return CentroidParams(spec.validation_fraction, spec.seed, base_fingerprint=context.base_fingerprint)


def train_centroid(texts: list[str], labels: list[str], model_dir: str, params: CentroidParams, report: Report) -> HeadResult:
    base = load_training_base(model_dir, params.base_fingerprint, "float32", "cpu")
    names = label_order(labels)
    y = torch.tensor([names.index(label) for label in labels])
    split = job_split(texts, labels, params.validation_fraction, params.seed, params.holdout_from)
    features = embed_texts(base, texts, 16, lambda done, total: None)
    centroids = torch.zeros(len(names), features.shape[1]).index_add_(0, y[split.train], features[split.train])
    weight = F.normalize(centroids, dim=-1)
    held = split.validation or split.train
    accuracy = float(((features[held] @ weight.t()).argmax(dim=1) == y[held]).float().mean())
    report(make_update("eval", f"centroid accuracy {accuracy:.4f}", 0.99, metrics={"accuracy": accuracy}))
    return HeadResult(weight, torch.zeros(len(names)), names, {"accuracy": accuracy}, base.spec.fingerprint)


CENTROID = Method("centroid", CentroidParams, centroid_params, train_centroid, head_files)

# -------------------------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    """A JobManager over a temp database with one dataset, training inline on the tiny model."""

    manager: JobManager
    runner: InlineRunner
    publisher: FakePublisher
    dataset: str
    model_dir: Path

    def spec(self, method: str, **kw: Any) -> JobSpec:
        return JobSpec(self.dataset, f"via-{method}", method=method, **kw)

    async def run(self, method: str) -> None:
        job = await self.manager.submit("acme", self.spec(method, epochs=20, max_steps=3, seed=1))
        events = await asyncio.wait_for(events_of(self.manager, job.id), 120)
        assert events[-1].state is JobState.SUCCEEDED, events[-1].message
        assert (await self.manager.get("acme", job.id)).method == method

    def published(self) -> Any:
        """The one adapter published, as the adapter store's validation reads it."""
        [request] = self.publisher.requests
        base = load_base_model(self.model_dir, dtype="float32", device="cpu")
        return AdapterValidator(base.spec, max_rank=8, max_labels=8).parse(request.files)


@pytest.fixture
async def gateway(tmp_path: Path, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    db = Database(tmp_path / "jobs.db")
    datasets = DatasetStore(tmp_path / "datasets", db)
    dataset = datasets.create("acme", "d", "jsonl", jsonl(separable_rows(12))).id
    runner, publisher = InlineRunner(tmp_path / "checkpoints"), FakePublisher()
    manager = JobManager(db, datasets, runner, publisher, tiny_model_dir, JobLimits(max_lora_rank=8))
    yield Gateway(manager, runner, publisher, dataset, tiny_model_dir)
    await manager.close()
    db.close()


@pytest.mark.parametrize("name", list(METHODS))
async def test_every_registered_method_is_trained_and_published_through_one_path(gateway: Gateway, name: str) -> None:
    await gateway.run(name)
    [params] = gateway.runner.params
    method = METHODS[name]
    assert type(params) is method.params and bool(getattr(params, "checkpoint_dir", "")) == method.resumable
    weights = gateway.published()
    assert weights.labels == ["animal", "money"] or weights.head_weight is None  # an `embed` adapter has no head


async def test_a_method_added_to_the_registry_is_offered_by_name_and_publishes_through_the_same_path(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(InvalidArgument, match="unknown method 'centroid'; use 'head', 'lora', 'embed' or 'auto'"):
        await gateway.manager.submit("acme", gateway.spec("centroid"))
    monkeypatch.setitem(METHODS, "centroid", CENTROID)
    with pytest.raises(InvalidArgument, match="unknown method 'nearest'; use 'head', 'lora', 'embed', 'centroid' or 'auto'"):
        await gateway.manager.submit("acme", gateway.spec("nearest"))
    with pytest.raises(InvalidArgument, match="out_of_scope_label works with the head method"):
        await gateway.manager.submit("acme", gateway.spec("centroid", out_of_scope_label="animal"))
    await gateway.run("centroid")
    assert isinstance(gateway.runner.params[0], CentroidParams)
    weights = gateway.published()
    assert weights.labels == ["animal", "money"] and weights.lora == {}


def test_the_cli_submits_the_servers_default_method() -> None:
    """The CLI sends what the server would choose for a SubmitJob without a method: its default is the contract."""
    from adaptgate_client.cli import build_parser

    from adaptgate.training.jobs.validation import normalized_spec

    args = build_parser().parse_args(["jobs", "submit", "--dataset", "ds-1", "--adapter-name", "a"])
    server_default = normalized_spec(JobSpec("ds-1", "a", method=""), JobLimits()).method
    assert normalized_spec(JobSpec("ds-1", "a", method=args.method), JobLimits()).method == server_default == JobSpec("d", "a").method
