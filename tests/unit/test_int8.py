"""Int8Linear: per-token activations and per-channel weights, so a row's output ignores its batch mates."""

from __future__ import annotations

import torch
from torch import nn

from adaptgate.engine.int8 import Int8Linear


def test_int8_linear_tracks_the_float_linear_and_ignores_batch_mates() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    x = torch.randn(16, 64)
    x[:, 3] *= 30  # an outlier channel, as BERT's activations have
    layer = Int8Linear(linear, x.abs().amax(0))
    expected, got = linear(x), layer(x)
    assert torch.nn.functional.cosine_similarity(got, expected, dim=1).min() > 0.999
    loud = torch.cat([x[:1], 100 * torch.randn(7, 64)])  # a batch mate with a far larger range
    torch.testing.assert_close(layer(loud)[0], got[0])
