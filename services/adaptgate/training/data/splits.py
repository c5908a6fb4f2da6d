"""A deterministic, stratified train/validation split that never splits copies of one text.

Stratified so every class with at least two distinct texts is seen on both sides; grouped by
text so duplicate rows cannot leak from train into validation (RELIABILITY row 22).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class Split:
    train: list[int]
    validation: list[int]


def validation_count(groups: int, fraction: float) -> int:
    """At least one group held out, at least one kept for training, when there are two."""
    if groups < 2:
        return 0
    return min(groups - 1, max(1, round(groups * fraction)))


def _groups_by_label(texts: list[str], labels: list[str]) -> dict[str, dict[str, list[int]]]:
    groups: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for index, (text, label) in enumerate(zip(texts, labels)):
        groups[label].setdefault(text, []).append(index)
    return groups


def stratified_split(texts: list[str], labels: list[str], fraction: float, seed: int) -> Split:
    """Same inputs and seed give the same split on any machine (Python's Mersenne Twister)."""
    rng = random.Random(seed)
    train: list[int] = []
    validation: list[int] = []
    groups = _groups_by_label(texts, labels)
    for label in sorted(groups):
        members = list(groups[label].values())
        rng.shuffle(members)
        held = validation_count(len(members), fraction)
        validation += [i for group in members[:held] for i in group]
        train += [i for group in members[held:] for i in group]
    return Split(sorted(train), sorted(validation))


def job_split(texts: list[str], labels: list[str], fraction: float, seed: int, holdout_from: int = 0) -> Split:
    """A job's split: rows from `holdout_from` on are a validation dataset the tenant gave (0: none,
    split the rows stratified instead)."""
    if holdout_from:
        return Split(list(range(holdout_from)), list(range(holdout_from, len(texts))))
    return stratified_split(texts, labels, fraction, seed)
