"""Classify's answers built for a whole batch at once equal the answers built row by row."""

from __future__ import annotations

import numpy as np
import pytest

from adaptgate.api.classifier import Abstain, to_classifications
from adaptgate.v1 import classifier_pb2 as pb


def per_row(probs: np.ndarray, labels: list[str], top_k: int, abstain: Abstain) -> pb.Classification:
    """The answer for one row, as Classify built it one row at a time."""
    order = np.argsort(-probs, kind="stable")
    if top_k:
        order = order[:top_k]
    scores = [pb.LabelScore(label=labels[i], score=float(probs[i])) for i in order]
    below = abstain.threshold is not None and scores[0].score < abstain.threshold
    if below or (abstain.learnt and labels[order[0]] == abstain.learnt):
        return pb.Classification(label=abstain.label, score=scores[0].score, scores=scores, abstained=True)
    return pb.Classification(label=scores[0].label, score=scores[0].score, scores=scores)


def batch(rows: int, labels: int, seed: int) -> np.ndarray:
    """Softmax rows with ties (equal logits) so that the stable order matters."""
    rng = np.random.default_rng(seed)
    logits = rng.integers(0, 4, size=(rows, labels)).astype(np.float32)
    return (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("n_labels", [5, 100], ids=["a small head", "a large head"])
@pytest.mark.parametrize("top_k", [0, 1, 2, 5])
@pytest.mark.parametrize(
    "abstain",
    [Abstain(), Abstain(threshold=0.45, label="unsure"), Abstain(learnt="c2", label="c2"), Abstain(0.3, "none", "c0")],
)
def test_the_batch_answers_as_each_row_alone(n_labels: int, top_k: int, abstain: Abstain) -> None:
    labels = [f"c{i}" for i in range(n_labels)]
    probs = batch(64, len(labels), seed=top_k)
    answers = to_classifications(probs, labels, top_k, abstain)
    expected = [per_row(p, labels, top_k, abstain) for p in probs]
    assert [a.SerializeToString(deterministic=True) for a in answers] == [
        e.SerializeToString(deterministic=True) for e in expected
    ]
    if (abstain.threshold is not None or abstain.learnt) and n_labels == 5:  # thresholds sized for five labels
        assert 0 < sum(a.abstained for a in answers) < len(answers), "the case exercises both answers"


def test_a_threshold_between_float32_neighbours_is_compared_in_float64() -> None:
    """A top score just under the threshold abstains even where float32 would round them equal."""
    probs = np.array([[0.5, 0.5]], dtype=np.float32)
    labels = ["a", "b"]
    abstain = Abstain(threshold=0.5 + 1e-9, label="unsure")
    [answer] = to_classifications(probs, labels, 0, abstain)
    assert answer == per_row(probs[0], labels, 0, abstain) and answer.abstained


def test_nan_scores_are_ordered_as_argsort_orders_them() -> None:
    """A broken head's NaN scores (Python's sort cannot order them) still get argsort's order: NaN last."""
    probs = np.array([[0.2, np.nan, 0.5, 0.3]], dtype=np.float32)
    labels = ["a", "b", "c", "d"]
    [answer] = to_classifications(probs, labels, 0)
    assert [s.label for s in answer.scores] == ["c", "d", "a", "b"] == [s.label for s in per_row(probs[0], labels, 0, Abstain()).scores]
