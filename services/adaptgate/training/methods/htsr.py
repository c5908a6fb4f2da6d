"""Per-block learning rates from heavy-tailed self-regularization (HTSR) theory.

HTSR (Martin & Mahoney, JMLR 2021) reads how well trained a weight matrix is from the tail of
its empirical spectral density: the eigenvalues of WᵀW follow a power law whose exponent alpha
is small (about 2) for well-trained, strongly correlated layers and large (over 4-6) for layers
that have learnt little. Layer-wise schedules built on it (TempBalance, Zhou et al. 2023) give the less-trained blocks
(higher alpha) a larger learning rate and the well-trained ones a smaller one.

alpha is the Hill estimator on the top half of the spectrum (k = n/2):
    alpha = 1 + k / sum_{i<=k} ln(lambda_i / lambda_{k+1}),   lambda_1 >= lambda_2 >= ...
A block's alpha is the mean over its linear layers, each taken as W + scaling·B·A when LoRA has
moved it. A block's multiplier grows with its alpha relative to the mean over the adapted blocks,
    m = clip(1 + GAIN · (alpha - mean) / mean, LOW, HIGH),
so blocks whose spectra look alike keep about the base rate (a min-max mapping, as TempBalance
uses across the dozens of layers of a deep net, would stretch MiniLM's 1.94-2.00 spread over the
whole range), and no block leaves [LOW, HIGH]. Computed per block at the start and once per
epoch, never per step: an SVD of every target matrix costs a fraction of a second on MiniLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOW, HIGH = 0.5, 1.5
GAIN = 2.0  # an alpha 10% above the mean gives 1.2x the base learning rate


def hill_alpha(weight: torch.Tensor) -> float:
    """The Hill tail-index estimate of the ESD of WᵀW (weight [out, in])."""
    eigs = torch.linalg.svdvals(weight.detach().float()).square().sort(descending=True).values
    eigs = eigs[eigs > 0]
    k = len(eigs) // 2
    if k < 1:
        return float("nan")
    logs = torch.log(eigs[:k] / eigs[k]).sum()
    return 1.0 + k / float(logs) if float(logs) > 0 else float("nan")


@dataclass
class BlockRate:
    block: int
    alpha: float
    multiplier: float
    learning_rate: float
    trained: bool = True

    def as_dict(self) -> dict[str, object]:
        return {"block": self.block, "alpha": round(self.alpha, 4), "multiplier": round(self.multiplier, 4),
                "learning_rate": self.learning_rate, "trained": self.trained}


def multipliers(alphas: dict[int, float], low: float = LOW, high: float = HIGH, gain: float = GAIN) -> dict[int, float]:
    """alpha -> LR multiplier: 1 + gain x the relative distance from the mean alpha, clipped to [low, high]; NaN -> 1."""
    finite = {b: a for b, a in alphas.items() if math.isfinite(a)}
    if not finite:
        return {b: 1.0 for b in alphas}
    mean = sum(finite.values()) / len(finite)
    return {b: min(high, max(low, 1.0 + gain * (finite[b] - mean) / mean)) if b in finite else 1.0 for b in alphas}


def describe(rates: list[BlockRate]) -> str:
    cells = [
        f"block {r.block}: alpha {r.alpha:.2f} -> lr {r.learning_rate:.2e}" if r.trained else f"block {r.block}: alpha {r.alpha:.2f} (frozen)"
        for r in rates
    ]
    return "; ".join(cells)
