"""Mixed-adapter batches give each row PEFT's own answer, whatever its batch mates are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.engine import Engine, EngineConfig, HeadWeights
from adaptgate.engine.model import load_base_model
from adaptgate.engine.rows import Row
from tests.unit.peft_adapters import adapter_files, make_peft_adapter

TEXTS = ["free entry in a weekly competition", "are we still on for lunch?", "URGENT! you have won", "ok see you soon"]


@pytest.fixture(scope="module")
def setup(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    validator = AdapterValidator(base.spec, max_rank=16, max_labels=8)
    adapters = []
    for seed, (labels, rank, targets) in enumerate([(2, 4, None), (3, 8, None), (5, 2, ["query", "value"])]):
        out = tmp_path_factory.mktemp(f"adapter{seed}")
        peft_model = make_peft_adapter(tiny_bert_dir, out, labels, rank, seed + 10, targets)
        adapters.append((peft_model, validator.parse(adapter_files(out))))
    # Every engine gets its own copy of the base: engines wrap the model's linears in place.
    return (lambda: load_base_model(tiny_bert_dir, dtype="float32", device="cpu")), adapters


def peft_probabilities(peft_model, tokenizer, texts: list[str]) -> np.ndarray:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(peft_model(**batch).logits, dim=-1).numpy()


async def run_engine(base, adapters, rows_spec: list[tuple[str, int]]) -> list[np.ndarray]:
    engine = Engine(base(), EngineConfig(n_slots=4, max_rank=16, max_labels=8))
    engine.start()
    try:
        for slot, (_, w) in enumerate(adapters):
            head = HeadWeights(w.head_weight, w.head_bias, w.head_input, w.normalize_head_input)
            await engine.install(slot, w.lora, w.scaling, head)
        ids = await engine.tokenize([t for t, _ in rows_spec], truncate=False)
        results = await engine.run([Row(i, lora_slot=s, head_slots=(s,)) for i, (_, s) in zip(ids, rows_spec)])
        return [r.probabilities[0] for r in results]
    finally:
        await engine.stop()


def test_mixed_batch_matches_peft_for_every_adapter(setup) -> None:
    base, adapters = setup
    rows = [(text, slot) for text in TEXTS for slot in range(len(adapters))]
    got = asyncio.run(run_engine(base, adapters, rows))
    for slot, (peft_model, weights) in enumerate(adapters):
        expected = peft_probabilities(peft_model, base().tokenizer, TEXTS)
        ours = np.stack([p for p, (_, s) in zip(got, rows) if s == slot])
        assert ours.shape == expected.shape == (len(TEXTS), len(weights.labels))
        np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_a_rows_answer_does_not_depend_on_its_batch_mates(setup) -> None:
    base, adapters = setup
    alone = asyncio.run(run_engine(base, adapters, [(TEXTS[0], 1)]))[0]
    crowded = asyncio.run(run_engine(base, adapters, [(TEXTS[2], 0), (TEXTS[0], 1), (TEXTS[3], 2), (TEXTS[1], 1)]))[1]
    np.testing.assert_allclose(alone, crowded, atol=1e-5)


def test_rows_without_adapter_see_the_bare_base(setup, tiny_bert_dir: Path) -> None:
    """Installing adapters must not leak into rows that asked for none (plain embeddings)."""
    from adaptgate.engine.pooling import Pooling

    base, adapters = setup

    async def embed(install: bool) -> np.ndarray:
        engine = Engine(base(), EngineConfig(n_slots=4, max_rank=16, max_labels=8))
        engine.start()
        if install:
            w = adapters[0][1]
            await engine.install(0, w.lora, w.scaling, None)
        ids = await engine.tokenize(TEXTS, truncate=False)
        rows = [Row(i, lora_slot=0 if (install and k % 2) else -1, pooling=Pooling.MEAN) for k, i in enumerate(ids)]
        out = await engine.run(rows)
        await engine.stop()
        return np.stack([r.embedding for r in out])

    bare, mixed = asyncio.run(embed(False)), asyncio.run(embed(True))
    np.testing.assert_allclose(bare[0::2], mixed[0::2], atol=1e-5)
    assert not np.allclose(bare[1::2], mixed[1::2], atol=1e-3)


def test_adapters_on_an_int8_base_stay_close_to_peft(setup, tiny_bert_dir: Path) -> None:
    """The opt-in int8 base (engine.int8) still takes every adapter, in mixed batches, near PEFT's answers."""
    _, adapters = setup
    int8_base = lambda: load_base_model(tiny_bert_dir, dtype="int8", device="cpu")  # noqa: E731
    assert int8_base().int8
    rows = [(text, slot) for text in TEXTS for slot in range(len(adapters))]
    got = asyncio.run(run_engine(int8_base, adapters, rows))
    for slot, (peft_model, _) in enumerate(adapters):
        expected = peft_probabilities(peft_model, int8_base().tokenizer, TEXTS)
        ours = np.stack([p for p, (_, s) in zip(got, rows) if s == slot])
        np.testing.assert_allclose(ours, expected, atol=0.03)
