"""The data plane behind Embed and Classify: resolve the adapter, lease its slot, run rows.

Sits between api/ (which translates protobuf) and engine/ + adapters/ (which know nothing of
each other beyond slots), so both RPCs share one path for tokens, leases and deadlines.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass

import numpy as np

from adaptgate.adapters.cache import AdapterCache, Resident
from adaptgate.adapters.refs import AdapterRef
from adaptgate.adapters.store import AdapterRecord
from adaptgate.engine.engine import Engine
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from adaptgate.errors import FailedPrecondition, InvalidArgument
from adaptgate.observability import stages


MAX_ADAPTERS_PER_REQUEST = 16


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
        self, texts: list[str], ref: AdapterRef | None, pooling: Pooling | None, normalize: bool | None,
        truncate: bool, deadline: float | None, tenant: str = "", prompt_name: str | None = None,
    ) -> Embedded:
        """`tenant` keys the batcher's fair queue: one tenant's backlog never holds another's rows back.

        pooling None and normalize None take the model's own (ModelSpec.default_pooling, .normalize), so a
        sentence-transformers directory embeds as its authors configured it; so does prompt_name None
        (its default prompt, if any); "" asks for no prompt (Engine.prompt)."""
        self._check_count(texts)
        prompt = self.engine.prompt(prompt_name)
        ids = await self.engine.tokenize(texts, truncate, prompt.text)
        stages.mark("tokenize")
        mode = pooling or self.engine.spec.default_pooling
        normalize = self.engine.spec.normalize if normalize is None else normalize
        if ref is None:
            results = await self.engine.run(
                [Row(i, pooling=mode, normalize=normalize, pool_skip=prompt.pool_skip, deadline=deadline, tenant=tenant)
                 for i in ids]
            )
        else:
            async with self.cache.lease(ref) as adapter:
                stages.mark("lease")
                rows = [Row(i, lora_slot=adapter.slot if adapter.has_lora else -1, pooling=mode, normalize=normalize,
                            pool_skip=prompt.pool_skip, deadline=deadline, tenant=tenant) for i in ids]
                results = await self.engine.run(rows)
        stages.lap()  # the engine's stages come from the batcher's timings (observability.stages)
        return Embedded([r.embedding for r in results if r.embedding is not None], [len(i) for i in ids])

    async def classify(
        self, texts: list[str], refs: list[AdapterRef], truncate: bool, deadline: float | None, tenant: str = ""
    ) -> list[Classified]:
        """One forward per text for all head-only adapters together, plus one per LoRA adapter."""
        self._check_count(texts)
        if len(refs) > MAX_ADAPTERS_PER_REQUEST:
            raise InvalidArgument(f"{len(refs)} adapters in one request; the limit is {MAX_ADAPTERS_PER_REQUEST}")
        if len(set(refs)) != len(refs):
            raise InvalidArgument("an adapter is listed twice; list each adapter once")
        ids = await self.engine.tokenize(texts, truncate)
        stages.mark("tokenize")
        async with AsyncExitStack() as stack:
            leased = [await stack.enter_async_context(self.cache.lease(ref)) for ref in refs]
            stages.mark("lease")
            for adapter in leased:
                if not adapter.has_head:
                    raise FailedPrecondition(f"adapter {adapter.record.ref} has no task head; use it with Embed")
            groups = [[a for a in leased if not a.has_lora]] + [[a] for a in leased if a.has_lora]
            groups = [g for g in groups if g]
            rows = [Row(i, lora_slot=_lora_slot(g), head_slots=tuple(a.slot for a in g), deadline=deadline, tenant=tenant)
                    for g in groups for i in ids]
            results = await self.engine.run(rows)
            stages.lap()  # the engine's stages come from the batcher's timings (observability.stages)
        answers: dict[int, Classified] = {}
        for k, group in enumerate(groups):
            block = results[k * len(ids) : (k + 1) * len(ids)]
            for j, adapter in enumerate(group):
                answers[id(adapter)] = Classified(adapter.record, [r.probabilities[j] for r in block])
        return [answers[id(a)] for a in leased]


def _lora_slot(group: list[Resident]) -> int:
    """A group is either all head-only adapters (no LoRA) or a single LoRA adapter."""
    return group[0].slot if len(group) == 1 and group[0].has_lora else -1
