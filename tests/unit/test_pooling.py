"""Pooling: each row's vector is its own tokens' (mean, CLS), whatever its batch mates ask for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import load_base_model
from adaptgate.engine.pooling import Pooling, mean_pool
from adaptgate.engine.rows import Row


def test_mean_pool_averages_only_the_real_tokens() -> None:
    hidden = torch.randn(3, 5, 4).bfloat16()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]])
    expected = torch.stack([hidden[i, : int(n)].float().mean(0) for i, n in enumerate(mask.sum(1))])
    torch.testing.assert_close(mean_pool(hidden, mask), expected)


def test_rows_asking_for_different_poolings_share_a_batch(tiny_bert_dir: Path) -> None:
    base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    forward = BatchForward(base, n_slots=1, max_rank=8, max_labels=2)
    ids = base.tokenizer(["hi there", "a much longer message about the weekly entry", "ok"])["input_ids"]
    asks = [(Pooling.MEAN, True), (Pooling.CLS, True), (Pooling.MEAN, False)]
    together = forward([Row(i, pooling=p, normalize=n) for i, (p, n) in zip(ids, asks)])
    for row_ids, (pooling, norm), got in zip(ids, asks, together):
        [alone] = forward([Row(row_ids, pooling=pooling, normalize=norm)])
        np.testing.assert_allclose(got.embedding, alone.embedding, atol=1e-5)
        assert (abs(float(np.linalg.norm(got.embedding)) - 1.0) < 1e-5) == norm  # the last row stays raw
    assert not np.allclose(together[0].embedding, together[1].embedding, atol=1e-3)  # MEAN is not CLS
