"""The unit of work the engine batches: one tokenized text and what to compute for it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaptgate.engine.pooling import Pooling


@dataclass
class Row:
    input_ids: list[int]
    lora_slot: int = -1  # engine slot of the row's LoRA weights, -1 for none
    head_slot: int = -1  # engine slot of the task head, -1 when only an embedding is wanted
    pooling: Pooling | None = None  # set when the row wants an embedding
    normalize: bool = True
    deadline: float | None = None  # time.monotonic() after which the row is dropped unrun


@dataclass
class RowResult:
    embedding: np.ndarray | None = None  # [hidden] fp32
    probabilities: np.ndarray | None = None  # [num_labels] fp32
