"""Validation scores shared by the training methods: loss, accuracy, macro-F1, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adaptgate.training.methods.head_fit import macro_f1


@dataclass
class Scores:
    step: int
    loss: float
    accuracy: float
    macro_f1: float
    # confusion[t][p]: validation rows of true label t predicted as p (label ids in label order)
    confusion: list[list[int]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1, "loss": self.loss}


def confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, num_labels: int) -> list[list[int]]:
    counts = torch.bincount(truth * num_labels + predicted, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels).tolist()


def score(logits: torch.Tensor, truth: torch.Tensor, step: int, num_labels: int) -> Scores:
    """logits [N, K] fp32, truth [N] label ids."""
    predicted = logits.argmax(dim=1)
    loss = float(F.cross_entropy(logits, truth))
    accuracy = float((predicted == truth).float().mean())
    return Scores(step, loss, accuracy, macro_f1(predicted, truth), confusion_matrix(predicted, truth, num_labels))


def describe_confusion(labels: list[str], confusion: list[list[int]], limit: int = 8) -> str:
    """'confusion (rows true, columns predicted) [ham: 380 2 | spam: 5 60]' for up to `limit` labels."""
    if not confusion or len(labels) > limit:
        return ""
    rows = " | ".join(f"{name}: {' '.join(str(c) for c in row)}" for name, row in zip(labels, confusion))
    return f"confusion (rows true, columns predicted) [{rows}]"
