"""The unit of work the engine batches: one tokenized text and what to compute for it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from adaptgate.engine.pooling import Pooling


@dataclass
class Row:
    input_ids: list[int]
    lora_slot: int = -1  # engine slot of the row's LoRA weights, -1 for none
    head_slots: tuple[int, ...] = ()  # engine slots of the task heads to apply (several heads, one forward)
    pooling: Pooling | None = None  # set when the row wants an embedding
    normalize: bool = True
    pool_skip: int = 0  # leading tokens (a prompt under include_prompt=False) left out of the pooled vector
    deadline: float | None = None  # time.monotonic() after which the row is dropped unrun
    tenant: str = ""  # the batcher's fair-queueing key: rows of one tenant share a queue (engine.batcher)


@dataclass
class RowResult:
    embedding: np.ndarray | None = None  # [hidden] fp32
    probabilities: list[np.ndarray] = field(default_factory=list)  # per head slot: [num_labels] fp32
