"""A Ray worker loads the base model from the gateway's path: a missing or different model fails the job in words."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptgate import server
from adaptgate.engine.model import load_base_model
from adaptgate.errors import AdaptgateError
from adaptgate.settings import Settings
from adaptgate.training.jobs.manager import JobManager
from adaptgate.training.methods.head import HeadParams
from adaptgate.training.methods.lora import LoraParams
from adaptgate.training.runners.worker_base import load_training_base

from .fakes import FakeRunner
from .test_job_manager import World, events_of


def test_a_missing_model_directory_is_named_with_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "base"
    with pytest.raises(AdaptgateError) as info:
        load_training_base(str(missing), "0123456789abcdef", "auto", "cpu")
    assert info.value.message == (
        f"the Ray worker cannot find the base model at {missing}; "
        "mount the gateway's model directory on the Ray workers at the same path"
    )


def test_a_different_model_is_refused_before_training(tiny_model_dir: Path, other_tiny_bert_dir: Path) -> None:
    expected = load_base_model(tiny_model_dir, "auto", "cpu").spec.fingerprint
    found = load_base_model(other_tiny_bert_dir, "auto", "cpu").spec.fingerprint
    assert found != expected
    with pytest.raises(AdaptgateError) as info:
        load_training_base(str(other_tiny_bert_dir), expected, "auto", "cpu")
    assert info.value.message == (
        f"the Ray worker's base model at {other_tiny_bert_dir} is not the gateway's "
        f"(fingerprint {found}, expected {expected})"
    )


def test_the_gateway_s_model_loads(tiny_model_dir: Path) -> None:
    expected = load_base_model(tiny_model_dir, "auto", "cpu").spec.fingerprint
    assert load_training_base(str(tiny_model_dir), expected, "auto", "cpu").spec.fingerprint == expected


async def test_jobs_carry_the_gateway_s_fingerprint_to_the_worker(tmp_path: Path) -> None:
    world = World(tmp_path, FakeRunner())
    manager = JobManager(
        world.db, world.datasets, world.runner, world.publisher, tmp_path / "model", base_fingerprint="fp-gateway"
    )
    try:
        for method in ("head", "lora"):
            job = await manager.submit("acme", world.spec(method=method, adapter_name=method))
            await events_of(manager, job.id)
    finally:
        await manager.close()
        await world.manager.close()
    head, lora = world.runner.params
    assert isinstance(head, HeadParams) and isinstance(lora, LoraParams)
    assert head.base_fingerprint == lora.base_fingerprint == "fp-gateway"


def test_training_gpus_reach_the_ray_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTGATE_TRAINING_GPUS", "0.5")
    settings = Settings()
    assert settings.training_gpus == 0.5
    runner = server.ray_runner(settings)
    assert runner is not None and runner.task_gpus == 0.5
    assert Settings.model_fields["training_gpus"].default == 0.0
