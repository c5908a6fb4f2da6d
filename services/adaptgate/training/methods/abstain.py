"""Out-of-scope inputs: a threshold on the top score below which a classifier abstains.

A job whose dataset marks some rows with an out-of-scope label learns that label as a class, and an
answer of that class is an abstention. Inputs unlike anything in training get no such help, so the
validation rows also choose a threshold on the top score: the lowest at which, of the rows the head
still answers with an in-scope label, at least `target_precision` are in scope; it abstains on as
few in-scope inputs as that precision allows. The threshold and the label travel in the adapter
(adaptgate.json), and Classify applies them unless a request gives its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

TARGET_PRECISION = 0.95


@dataclass(frozen=True)
class Abstention:
    label: str
    threshold: float
    out_of_scope_recall: float  # out-of-scope rows abstained on
    in_scope_coverage: float  # in-scope validation rows still answered
    in_scope_precision: float  # of the answered rows, the share in scope
    in_scope_accuracy: float = 0.0  # in-scope validation rows answered with their own label

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "abstain_threshold": self.threshold, "out_of_scope_recall": self.out_of_scope_recall,
            "in_scope_coverage": self.in_scope_coverage, "in_scope_precision": self.in_scope_precision,
            "in_scope_accuracy": self.in_scope_accuracy,
        }

    def describe(self) -> str:
        return (
            f"abstains as {self.label!r} below a top score of {self.threshold:.4f}: out-of-scope recall "
            f"{self.out_of_scope_recall:.4f} at in-scope precision {self.in_scope_precision:.4f}, "
            f"{self.in_scope_coverage:.4f} of in-scope rows still answered"
        )


def calibrate(in_scope_top: torch.Tensor, out_of_scope_top: torch.Tensor, label: str,
              target_precision: float = TARGET_PRECISION) -> Abstention:
    """in_scope_top / out_of_scope_top: [n] top scores of in-scope and out-of-scope validation rows
    (at least one of each); a negative score marks a row that abstains at any threshold."""
    scores = torch.cat([in_scope_top, out_of_scope_top]).float()
    in_scope = torch.cat([torch.ones_like(in_scope_top), torch.zeros_like(out_of_scope_top)]).float()
    order = torch.argsort(scores)
    scores, in_scope = scores[order], in_scope[order]
    answered_in = in_scope.flip(0).cumsum(0).flip(0)  # rows at or above each score
    answered = torch.arange(len(scores), 0, -1, dtype=torch.float32)
    precision = answered_in / answered
    # Ties: a threshold admits every row of its score, so only the first row of each score is a candidate.
    first = torch.ones_like(scores, dtype=torch.bool)
    first[1:] = scores[1:] != scores[:-1]
    ok = torch.nonzero((precision >= target_precision) & first & (scores >= 0))
    threshold = float(scores[ok[0, 0]]) if len(ok) else float(scores[-1]) + 1e-6
    return _at(in_scope_top.float(), out_of_scope_top.float(), label, threshold)


def calibrate_head(probs: torch.Tensor, truth: torch.Tensor, out_of_scope: int, label: str,
                   target_precision: float = TARGET_PRECISION) -> Abstention:
    """probs [n, K] of the validation rows, truth [n] label ids, `out_of_scope` the id of the
    out-of-scope class (an answer of that class abstains at any threshold)."""
    top, predicted = probs.max(dim=1)
    top = torch.where(predicted == out_of_scope, torch.full_like(top, -1.0), top)
    inside = truth != out_of_scope
    if not inside.any() or inside.all():  # nothing to weigh against: abstain only by class
        return _at(top[inside], top[~inside], label, 0.0)
    found = calibrate(top[inside], top[~inside], label, target_precision)
    answered = top[inside] >= found.threshold
    accuracy = float((answered & (predicted[inside] == truth[inside])).float().mean())
    return dataclasses.replace(found, in_scope_accuracy=accuracy)


def _at(in_scope_top: torch.Tensor, out_of_scope_top: torch.Tensor, label: str, threshold: float) -> Abstention:
    answered_in = int((in_scope_top >= threshold).sum())
    answered_out = int((out_of_scope_top >= threshold).sum())
    return Abstention(
        label=label, threshold=threshold,
        out_of_scope_recall=1.0 - answered_out / max(1, len(out_of_scope_top)),
        in_scope_coverage=answered_in / max(1, len(in_scope_top)),
        in_scope_precision=answered_in / max(1, answered_in + answered_out),
    )
