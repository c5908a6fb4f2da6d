"""The data plane behind Embed and Classify: resolve the adapter, lease its slot, run rows.

Sits between api/ (which translates protobuf) and engine/ + adapters/ (which know nothing of
each other beyond slots), so both RPCs share one path for tokens, leases and deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adaptgate.adapters.cache import AdapterCache
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterRecord
from adaptgate.engine.engine import Engine
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from adaptgate.errors import FailedPrecondition, InvalidArgument


@dataclass
class Embedded:
    vectors: list[np.ndarray]
    tokens: list[int]


@dataclass
class Classified:
    record: AdapterRecord
    probabilities: list[np.ndarray]


class Inference:
    def __init__(self, engine: Engine, cache: AdapterCache, max_texts: int) -> None:
        self.engine = engine
        self.cache = cache
        self.max_texts = max_texts

    def _check_count(self, texts: list[str]) -> None:
        if not texts:
            raise InvalidArgument("texts is empty; send at least one text")
        if len(texts) > self.max_texts:
            raise InvalidArgument(f"{len(texts)} texts in one request; the limit is {self.max_texts}, split the request")

    async def embed(
        self, texts: list[str], ref: AdapterRef | None, pooling: Pooling | None, normalize: bool,
        truncate: bool, deadline: float | None,
    ) -> Embedded:
        self._check_count(texts)
        ids = await self.engine.tokenize(texts, truncate)
        mode = pooling or self.engine.spec.default_pooling
        if ref is None:
            results = await self.engine.run([Row(i, pooling=mode, normalize=normalize, deadline=deadline) for i in ids])
        else:
            async with self.cache.lease(ref) as adapter:
                rows = [Row(i, lora_slot=adapter.slot if adapter.has_lora else -1, pooling=mode,
                            normalize=normalize, deadline=deadline) for i in ids]
                results = await self.engine.run(rows)
        return Embedded([r.embedding for r in results if r.embedding is not None], [len(i) for i in ids])

    async def classify(self, texts: list[str], ref: AdapterRef, truncate: bool, deadline: float | None) -> Classified:
        self._check_count(texts)
        ids = await self.engine.tokenize(texts, truncate)
        async with self.cache.lease(ref) as adapter:
            if not adapter.has_head:
                raise FailedPrecondition(f"adapter {adapter.record.ref} has no task head; use it with Embed")
            lora = adapter.slot if adapter.has_lora else -1
            results = await self.engine.run([Row(i, lora_slot=lora, head_slot=adapter.slot, deadline=deadline) for i in ids])
        return Classified(adapter.record, [r.probabilities for r in results if r.probabilities is not None])
