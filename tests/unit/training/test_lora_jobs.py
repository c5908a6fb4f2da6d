"""JobManager with `lora` and `auto`: params, publishing LoRA files, details, checkpoint clean-up, the DB migration."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from safetensors.torch import load

from adaptgate.training.db.database import Database
from adaptgate.training.jobs.records import JobRecord, JobSpec, JobState
from adaptgate.training.jobs.store import JobStore
from adaptgate.training.methods.auto import HEAD_MAX_ROWS, choose_method
from adaptgate.training.methods.head import HeadParams
from adaptgate.training.methods.lora import LoraParams

from .conftest import jsonl, separable_rows
from .fakes import LORA_MODULE, FakeRunner
from .test_job_manager import World, events_of


def big_rows(per_class: int) -> list[dict[str, str]]:
    return [{"text": f"{r['text']} #{k}", "label": r["label"]} for k in range(per_class // 30 + 1) for r in separable_rows(30)][: 2 * per_class]


@pytest.fixture
async def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    w = World(tmp_path, FakeRunner())
    yield w
    await w.manager.close()


async def test_lora_job_gets_lora_params_and_publishes_peft_lora_files(world: World) -> None:
    spec = world.spec(method="lora", alias="prod", seed=5, lora_rank=8, batch_size=16, max_tokens=48, max_steps=90)
    job = await world.manager.submit("acme", spec)
    events = await events_of(world.manager, job.id)
    assert events[-1].state is JobState.SUCCEEDED, events[-1].message
    [params] = world.runner.params
    assert isinstance(params, LoraParams) and not params.auto
    assert (params.seed, params.rank, params.batch_size, params.max_tokens, params.max_steps) == (5, 8, 16, 48, 90)
    [request] = world.publisher.requests
    tensors = load(request.files["adapter_model.safetensors"])
    assert f"base_model.model.bert.{LORA_MODULE}.lora_A.weight" in tensors
    assert tensors["base_model.model.classifier.weight"].shape == (2, 8)
    config = json.loads(request.files["adapter_config.json"])
    assert (config["r"], config["lora_alpha"], config["target_modules"], config["task_type"]) == (4, 8, [LORA_MODULE], "SEQ_CLS")
    meta = json.loads(request.files["adaptgate.json"])
    assert (meta["head_input"], meta["normalize"], meta["base_fingerprint"]) == ("mean", False, "fp-test")
    assert "confusion (rows true, columns predicted) [animal: 5 1 | money: 1 5]" in events[-1].message
    assert events[-1].details["confusion"]["matrix"] == [[5, 1], [1, 5]]
    assert not any(e.kind == "skip" for e in events)
    final = await world.manager.get("acme", job.id)
    assert final.details["confusion"]["labels"] == ["animal", "money"]
    assert (final.lora_rank, final.max_steps, final.auto) == (8, 90, False)
    assert world.runner.discarded == [job.id]  # checkpoints go once the job is terminal


async def test_auto_chooses_lora_for_a_large_dataset_and_says_why(tmp_path: Path) -> None:
    w = World(tmp_path, FakeRunner())
    dataset = w.datasets.create("acme", "big", "jsonl", jsonl(big_rows(HEAD_MAX_ROWS // 2 + 10))).id
    job = await w.manager.submit("acme", w.spec(dataset_id=dataset, method="auto"))
    assert (job.method, job.auto) == ("lora", True)
    events = await events_of(w.manager, job.id)
    note = next(e for e in events if e.kind == "log" and "method 'auto' chose" in e.message)
    assert "chose 'lora'" in note.message and note.details["method"]["chosen"] == "lora"
    [params] = w.runner.params
    assert isinstance(params, LoraParams) and params.auto
    assert (await w.manager.get("acme", job.id)).details["method"]["chosen"] == "lora"
    await w.manager.close()


async def test_auto_on_small_data_runs_a_head(world: World) -> None:
    job = await world.manager.submit("acme", world.spec(method="auto"))
    await events_of(world.manager, job.id)
    assert isinstance(world.runner.params[0], HeadParams)


async def test_failed_and_cancelled_jobs_drop_their_checkpoints_but_shutdown_keeps_them(tmp_path: Path) -> None:
    import asyncio

    w = World(tmp_path, FakeRunner(gate=asyncio.Event()))
    job = await w.manager.submit("acme", w.spec(method="lora"))
    await asyncio.wait_for(w.runner.mid_training.wait(), 5)
    await w.manager.close()  # gateway shutdown: the job must resume later, from its checkpoint
    assert w.runner.discarded == []
    w.runner.gate = None
    again = World(tmp_path, w.runner)
    await again.manager.start()
    await events_of(again.manager, job.id)
    assert w.runner.discarded == [job.id]
    await again.manager.close()


def test_choose_method_thresholds() -> None:
    assert choose_method(999, 2)[0] == "head"
    assert choose_method(5000, 200)[0] == "head"  # 25 rows per label
    method, reason = choose_method(20000, 2)
    assert method == "lora" and "HTSR" in reason and "early stopping" in reason


def test_an_old_database_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, dataset_id TEXT NOT NULL, adapter_name TEXT NOT NULL,"
        " method TEXT NOT NULL, alias TEXT NOT NULL, validation_fraction REAL NOT NULL, epochs INTEGER NOT NULL,"
        " learning_rate REAL NOT NULL, seed INTEGER NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL,"
        " adapter_ref TEXT NOT NULL, progress REAL NOT NULL, metrics TEXT NOT NULL, created_at REAL NOT NULL,"
        " updated_at REAL NOT NULL);"
        "CREATE TABLE job_events (job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, state TEXT NOT NULL,"
        " kind TEXT NOT NULL, message TEXT NOT NULL, progress REAL NOT NULL, metrics TEXT NOT NULL,"
        " eta_seconds REAL NOT NULL, PRIMARY KEY (job_id, seq));"
        "INSERT INTO jobs VALUES ('job-old', 'acme', 'ds-1', 'spam', 'head', '', 0.1, 0, 0.0, 0, 'SUCCEEDED', '', "
        "'acme/spam@v1', 1.0, '{}', 1.0, 1.0);"
    )
    conn.commit()
    conn.close()
    store = JobStore(Database(path))
    old = store.get("job-old")
    assert old is not None and (old.method, old.lora_rank, old.auto, old.details) == ("head", 0, False, {})
    record = JobRecord.new("acme", JobSpec("ds-1", "x", method="lora", lora_rank=8, auto=True))
    from adaptgate.training.jobs.records import JobEvent

    store.insert(record, JobEvent(record.id, 0, 0.0, JobState.QUEUED, "state", "queued", details={"k": 1}))
    again = store.get(record.id)
    assert again is not None and (again.lora_rank, again.auto) == (8, True)
    assert store.events_after(record.id, 0)[0].details == {"k": 1}
