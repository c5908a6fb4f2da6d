"""The `embed` method on the tiny BERT: contrastive LoRA, LoRA-only files, served by Embed exactly as trained."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch

from adaptgate.adapters.format import lora_files
from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.engine import Engine, EngineConfig
from adaptgate.engine.model import load_base_model
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from adaptgate.training.methods.embed import EmbedParams, EmbedResult, _EmbedTrainer
from adaptgate.training.methods.lora_data import pad
from adaptgate.training.methods.train import train
from adaptgate.training.runners.updates import Update

from .conftest import separable_rows

ROWS = separable_rows(40)
TEXTS, LABELS = [r["text"] for r in ROWS], [r["label"] for r in ROWS]
PARAMS = EmbedParams(dtype="float32", device="cpu", learning_rate=1e-2, batch_size=16, max_tokens=32, seed=3,
                     validation_fraction=0.25, max_steps=40, eval_every=20)
PROBE = ["the cat and the dog sleep 3", "price stock report 9", "a zebra at the bank"]


def test_embed_trains_and_embed_serves_exactly_the_trained_vectors(tiny_model_dir: Path) -> None:
    torch.manual_seed(3)
    updates: list[Update] = []
    trainer = _EmbedTrainer(TEXTS, LABELS, str(tiny_model_dir), PARAMS, updates.append)
    result = trainer.run()
    assert isinstance(result, EmbedResult) and result.pooling == "mean" and result.normalize
    assert result.metrics["accuracy"] >= 0.9  # nearest class centroid on the validation split
    assert "contrastive LoRA embeddings" in updates[0]["message"]
    assert not any(name.startswith("head.") for name in trainer.model.trainable())

    files = lora_files(result.lora, result.rank, result.alpha, None, None, result.labels, result.fingerprint, "job:e",
                       base_prefix=result.base_prefix, head_input=result.pooling, normalize=result.normalize)
    assert "labels.json" not in files
    base = load_base_model(tiny_model_dir, dtype="float32", device="cpu")
    weights = AdapterValidator(base.spec, max_rank=16, max_labels=8).parse(files)
    assert weights.head_weight is None and len(weights.lora) == 12

    with torch.no_grad():
        ids = [trainer.base.tokenizer(t)["input_ids"] for t in PROBE]
        own = trainer.model.features(*pad(ids, 0, torch.device("cpu"))).numpy()

    async def serve() -> list[np.ndarray]:
        engine = Engine(base, EngineConfig(n_slots=2, max_rank=16, max_labels=8))
        engine.start()
        try:
            await engine.install(0, weights.lora, weights.scaling, None)
            tokens = await engine.tokenize(PROBE, truncate=False)
            rows = [Row(t, lora_slot=0, pooling=Pooling.MEAN, normalize=True) for t in tokens]
            plain = [Row(t, pooling=Pooling.MEAN, normalize=True) for t in tokens]
            return [r.embedding for r in await engine.run(rows + plain)]
        finally:
            await engine.stop()

    served = np.stack(asyncio.run(serve()))
    np.testing.assert_allclose(served[:3], own, atol=1e-5)
    assert not np.allclose(served[:3], served[3:], atol=1e-3)  # the adapter changed the vectors


def test_embed_is_dispatched_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    import dataclasses

    import pytest

    class Killed(Exception):
        pass

    def die(update: Update) -> None:
        if update["kind"] == "eval" and "step 20/" in update["message"]:
            raise Killed

    params = dataclasses.replace(PARAMS, checkpoint_dir=str(tmp_path / "ckpt"))
    straight = train(TEXTS, LABELS, str(tiny_model_dir), PARAMS, lambda u: None)
    with pytest.raises(Killed):
        train(TEXTS, LABELS, str(tiny_model_dir), params, die)
    resumed = train(TEXTS, LABELS, str(tiny_model_dir), params, lambda u: None)
    assert isinstance(resumed, EmbedResult) and resumed.resumed_from == 20 and resumed.steps == 40
    for module, (a, b) in straight.lora.items():
        torch.testing.assert_close(resumed.lora[module][0], a)
        torch.testing.assert_close(resumed.lora[module][1], b)
