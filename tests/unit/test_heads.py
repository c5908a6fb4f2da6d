"""Task heads of very different sizes in one batch: each head is stored at its own size class, so a
1,000-label head costs its own memory and small heads do not pay for it."""

from __future__ import annotations

import torch

from adaptgate.engine.heads import HeadPool

HIDDEN = 16


def head(labels: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(labels, HIDDEN, generator=g), torch.randn(labels, generator=g)


def reference(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.nn.functional.linear(features, weight, bias), dim=-1)


def test_mixed_head_sizes_match_each_head_alone() -> None:
    pool = HeadPool(n_slots=8, hidden=HIDDEN, max_labels=1024, device=torch.device("cpu"))
    heads = {0: head(2, 0), 1: head(1000, 1), 2: head(5, 2), 5: head(130, 3)}
    for slot, (w, b) in heads.items():
        pool.install(slot, w, b, "mean", False)
    slots = [1, 0, 2, 1, 5, 0]
    features = torch.randn(len(slots), HIDDEN)
    probs = pool.probabilities(features, slots)
    assert [p.shape[0] for p in probs] == [heads[s][0].shape[0] for s in slots]
    for j, slot in enumerate(slots):
        torch.testing.assert_close(probs[j], reference(features[j : j + 1], *heads[slot])[0])


def test_small_heads_do_not_pay_for_the_largest_head() -> None:
    small = HeadPool(n_slots=64, hidden=384, max_labels=1024, device=torch.device("cpu"))
    for slot in range(64):
        small.install(slot, *(torch.randn(2, 384), torch.randn(2)), "mean", False)
    dense_bytes = 64 * 384 * 1024 * 4
    assert small.nbytes() < dense_bytes / 50
    mixed = HeadPool(n_slots=64, hidden=384, max_labels=1024, device=torch.device("cpu"))
    for slot in range(63):
        mixed.install(slot, torch.randn(2, 384), torch.randn(2), "mean", False)
    mixed.install(63, torch.randn(1000, 384), torch.randn(1000), "mean", False)
    assert mixed.nbytes() - small.nbytes() < 4 * (384 + 1) * 1024 * 2  # one large head, not 64


def test_a_slot_reinstalled_at_another_size_and_cleared_slots_free_their_room() -> None:
    pool = HeadPool(n_slots=4, hidden=HIDDEN, max_labels=1024, device=torch.device("cpu"))
    pool.install(0, *head(1000, 0), "mean", False)
    grown = pool.nbytes()
    pool.install(0, *head(3, 1), "mean", False)  # the same slot now holds a small head
    features = torch.randn(1, HIDDEN)
    torch.testing.assert_close(pool.probabilities(features, [0])[0], reference(features, *head(3, 1))[0])
    pool.clear(0)
    for slot in range(4):  # four large heads fit in room the pool grows to, and reuse freed entries
        pool.install(slot, *head(1000, slot), "mean", False)
    for slot in range(4):
        pool.clear(slot)
    for slot in range(4):
        pool.install(slot, *head(1000, 10 + slot), "mean", False)
    assert pool.nbytes() <= 4 * grown + 4 * (HIDDEN + 1) * 32 * 4
    torch.testing.assert_close(pool.probabilities(features, [3])[0], reference(features, *head(1000, 13))[0])
