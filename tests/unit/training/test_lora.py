"""The `lora` method on the tiny BERT: learns, serves exactly what it trained, resumes, diverges loudly."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptgate.adapters.format import lora_files
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.engine import Engine, EngineConfig, HeadWeights
from adaptgate.engine.model import load_base_model
from adaptgate.engine.rows import Row
from adaptgate.training.methods.head_fit import TrainingDiverged
from adaptgate.training.methods.htsr import HIGH, LOW, hill_alpha, multipliers
from adaptgate.training.methods.lora import LoraParams, _Trainer, train_lora
from adaptgate.training.methods.lora_data import epoch_batches, steps_per_epoch
from adaptgate.training.methods.lora_model import block_of, select_targets
from adaptgate.training.runners.checkpoints import CheckpointDir, signature
from adaptgate.training.runners.updates import Update

from .conftest import separable_rows

ROWS = separable_rows(40)
TEXTS, LABELS = [r["text"] for r in ROWS], [r["label"] for r in ROWS]
FAST = {"dtype": "float32", "device": "cpu", "learning_rate": 1e-2, "batch_size": 16, "max_tokens": 32}
PROBE = ["the cat and the dog sleep 3", "price stock report 9", "a zebra at the bank", "loan tax budget", "x"]


def trained(tiny_model_dir: Path, **kw: object) -> tuple[_Trainer, object, list[Update]]:
    torch.manual_seed(0)
    updates: list[Update] = []
    params = LoraParams(**{**FAST, "seed": 1, "validation_fraction": 0.25, "max_steps": 60, "eval_every": 20, **kw})
    trainer = _Trainer(TEXTS, LABELS, str(tiny_model_dir), params, updates.append)
    return trainer, trainer.run(), updates


def test_lora_learns_and_reports(tiny_model_dir: Path) -> None:
    _, result, updates = trained(tiny_model_dir)
    assert result.metrics["accuracy"] >= 0.9 and result.labels == ["animal", "money"]
    assert result.rank == 16 and result.alpha == 32 and result.head_input == "mean" and not result.normalize
    assert all(block_of(m) is not None for m in result.lora) and len(result.lora) == 12  # 2 blocks x 6 linears
    assert sum(sum(row) for row in result.confusion) == 20  # the whole validation split
    kinds = [u["kind"] for u in updates]
    assert kinds[0] == "started" and kinds.count("eval") == 4  # steps 20, 40, 60 and the final full evaluation
    assert "progress" in kinds
    assert updates[-1]["details"]["confusion"]["labels"] == ["animal", "money"]
    assert [u["progress"] for u in updates] == sorted(u["progress"] for u in updates)
    assert any(u["eta_seconds"] > 0 for u in updates if u["kind"] == "progress")


def test_served_probabilities_equal_the_trained_models(tiny_model_dir: Path) -> None:
    """Publish the adapter, validate it as an upload would be, serve it: same probabilities as training's model."""
    trainer, result, _ = trained(tiny_model_dir, max_steps=30, eval_every=30)
    files = lora_files(result.lora, result.rank, result.alpha, result.weight, result.bias, result.labels,
                       result.fingerprint, "job:test", base_prefix=result.base_prefix, head_input=result.head_input,
                       normalize=result.normalize)
    base = load_base_model(tiny_model_dir, dtype="float32", device="cpu")
    weights = AdapterValidator(base.spec, max_rank=16, max_labels=8).parse(files)
    assert weights.labels == ["animal", "money"] and weights.head_input == "mean" and len(weights.lora) == 12

    with torch.no_grad():
        ids = [trainer.base.tokenizer(t)["input_ids"] for t in PROBE]
        from adaptgate.training.methods.lora_data import pad

        own = torch.softmax(trainer.model(*pad(ids, 0, torch.device("cpu"))), dim=-1).numpy()

    async def serve() -> list[np.ndarray]:
        engine = Engine(base, EngineConfig(n_slots=2, max_rank=16, max_labels=8))
        engine.start()
        try:
            head = HeadWeights(weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
            await engine.install(1, weights.lora, weights.scaling, head)
            tokens = await engine.tokenize(PROBE, truncate=False)
            return [r.probabilities[0] for r in await engine.run([Row(t, lora_slot=1, head_slots=(1,)) for t in tokens])]
        finally:
            await engine.stop()

    served = np.stack(asyncio.run(serve()))
    np.testing.assert_allclose(served, own, atol=1e-5)
    assert not np.allclose(own[:, 0], 0.5, atol=0.05)  # a trained head, not a uniform one


def test_same_seed_same_weights_and_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    class Killed(Exception):
        pass

    def die_after_step_40(update: Update) -> None:
        if update["kind"] == "eval" and "step 40/" in update["message"]:
            raise Killed  # the worker dies right after the checkpoint of step 40

    params = LoraParams(**{**FAST, "seed": 1, "validation_fraction": 0.25, "max_steps": 60, "eval_every": 20,
                           "checkpoint_dir": str(tmp_path / "ckpt")})
    straight = train_lora(TEXTS, LABELS, str(tiny_model_dir), dataclasses.replace(params, checkpoint_dir=""), lambda u: None)
    again = train_lora(TEXTS, LABELS, str(tiny_model_dir), dataclasses.replace(params, checkpoint_dir=""), lambda u: None)
    torch.testing.assert_close(again.weight, straight.weight)  # same seed, same weights
    with pytest.raises(Killed):
        train_lora(TEXTS, LABELS, str(tiny_model_dir), params, die_after_step_40)
    updates: list[Update] = []
    resumed = train_lora(TEXTS, LABELS, str(tiny_model_dir), params, updates.append)
    assert resumed.resumed_from == 40 and resumed.steps == 60
    assert any("resumed from the checkpoint at step 40/60" in u["message"] for u in updates)
    assert [u["kind"] for u in updates].count("eval") == 2  # step 60 and the final evaluation only
    for module, (a, b) in straight.lora.items():
        torch.testing.assert_close(resumed.lora[module][0], a)
        torch.testing.assert_close(resumed.lora[module][1], b)
    torch.testing.assert_close(resumed.weight, straight.weight)
    assert resumed.metrics == pytest.approx(straight.metrics)


def test_a_checkpoint_of_other_inputs_is_ignored(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    CheckpointDir(directory).save({"x": torch.zeros(1)}, {"signature": signature("other"), "step": 5})
    updates: list[Update] = []
    params = LoraParams(**{**FAST, "max_steps": 10, "eval_every": 10, "checkpoint_dir": str(directory)})
    result = train_lora(TEXTS, LABELS, str(tiny_model_dir), params, updates.append)
    assert result.resumed_from == 0 and not any("resumed" in u["message"] for u in updates)
    assert CheckpointDir(directory).load(signature("other")) is None  # overwritten by this run's checkpoint


@pytest.mark.parametrize("learning_rate", [1e4, 10.0])
def test_an_absurd_learning_rate_fails_with_a_clear_reason(tiny_model_dir: Path, learning_rate: float) -> None:
    params = LoraParams(**{**FAST, "learning_rate": learning_rate, "max_steps": 200, "eval_every": 100})
    with pytest.raises(TrainingDiverged, match=r"training diverged: .*(NaN|infinite|grew to).*try a lower learning_rate"):
        train_lora(TEXTS, LABELS, str(tiny_model_dir), params, lambda u: None)


def test_auto_reports_a_block_table_each_epoch_and_stops_early(tiny_model_dir: Path) -> None:
    updates: list[Update] = []
    params = LoraParams(**{**FAST, "auto": True, "epochs": 20, "eval_every": 4, "patience": 2, "seed": 2})
    result = train_lora(TEXTS, LABELS, str(tiny_model_dir), params, updates.append)
    tables = [u for u in updates if "blocks" in u.get("details", {})]
    assert tables and "per-block learning rates from HTSR alpha" in tables[0]["message"]
    rows = tables[0]["details"]["blocks"]
    assert [r["block"] for r in rows] == [0, 1]
    assert all(LOW <= r["multiplier"] <= HIGH for r in rows)
    assert any("early stopping at step" in u["message"] for u in updates)
    per_epoch = steps_per_epoch(72, 16)  # 80 rows, 8 held out
    assert result.steps < 20 * per_epoch  # it did stop early
    assert len(tables) == -(-result.steps // per_epoch)  # one table per epoch started


def test_hill_alpha_orders_heavy_and_light_tails() -> None:
    torch.manual_seed(0)
    gaussian = torch.randn(256, 128)  # Marchenko-Pastur bulk: a light tail, a large alpha
    u, _, v = torch.linalg.svd(torch.randn(256, 128), full_matrices=False)
    heavy = u @ torch.diag(torch.arange(1, 129, dtype=torch.float32) ** -1.0) @ v  # power-law spectrum
    assert hill_alpha(heavy) < hill_alpha(gaussian)
    table = multipliers({0: 2.0, 1: 4.0, 2: 3.0, 3: float("nan")})
    assert table == {0: LOW, 1: HIGH, 2: pytest.approx((LOW + HIGH) / 2), 3: 1.0}
    assert multipliers({0: 3.0, 1: 3.0}) == {0: 1.0, 1: 1.0}


def test_batches_are_deterministic_complete_and_grouped_by_length() -> None:
    lengths = [i % 37 + 3 for i in range(1000)]
    indices = list(range(0, 1000, 2))
    first = epoch_batches(indices, lengths, 16, seed=3, epoch=0)
    assert first == epoch_batches(indices, lengths, 16, seed=3, epoch=0)
    assert first != epoch_batches(indices, lengths, 16, seed=3, epoch=1)
    assert sorted(i for b in first for i in b) == indices and len(first) == steps_per_epoch(500, 16)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
    assert spread < 5  # sorted within mega-batches: little padding


def test_targets_skip_frozen_blocks(tiny_model_dir: Path) -> None:
    spec = load_base_model(tiny_model_dir, dtype="float32", device="cpu").spec
    upper = select_targets(spec, 1)
    assert upper and all(block_of(n) == 1 for n in upper) and "pooler.dense" not in upper
    assert select_targets(spec, 0, ("query", "value")) == [
        "encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.value",
    ]
