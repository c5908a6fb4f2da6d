"""The engine facade: tokenize, batch, run; install adapter weights into slots between batches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaptgate.engine.batcher import Batcher, BatcherLimits, BatchStats
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import BaseModel, ModelSpec
from adaptgate.engine.rows import Row, RowResult
from adaptgate.engine.thread import EngineThread
from adaptgate.errors import InputTooLong, InvalidArgument

# A token is rarely more than this many characters; longer texts fail before the tokenizer runs.
MAX_CHARS_PER_TOKEN = 32


@dataclass
class EngineConfig:
    n_slots: int = 64
    max_rank: int = 16
    max_labels: int = 128
    max_batch_tokens: int = 2048
    max_wait_s: float = 0.002
    max_queue_rows: int = 4096
    max_input_tokens: int = 0  # 0 = the model's own limit
    cpu_kernels: bool = True  # on CPU: the fused kernels when they build here (engine.cpu_kernels)


@dataclass
class HeadWeights:
    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor  # [num_labels]
    head_input: str  # "pooler" | "mean" | "cls" | "last_token"
    normalize: bool


class Engine:
    def __init__(
        self,
        base: BaseModel,
        config: EngineConfig,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
        thread: EngineThread | None = None,
    ) -> None:
        """`thread` should be the one that loaded `base` (see engine.thread); a new one otherwise."""
        self.base = base
        self.config = config
        self.max_tokens = min(config.max_input_tokens or base.spec.max_tokens, base.spec.max_tokens)
        if self.max_tokens > config.max_batch_tokens:
            raise ValueError(f"max_batch_tokens {config.max_batch_tokens} cannot hold one {self.max_tokens}-token input")
        # One thread owns the model: forwards and slot writes never overlap.
        self._thread = thread or EngineThread()
        self._executor = self._thread.executor
        self._forward = self._thread.call(
            BatchForward, base, config.n_slots, config.max_rank, config.max_labels, True, config.cpu_kernels
        )
        padding_free = self._forward.packed is not None
        limits = BatcherLimits(config.max_batch_tokens, config.max_wait_s, config.max_queue_rows, padding_free)
        self._batcher = Batcher(self._forward, self._executor, limits, on_batch)

    @property
    def spec(self) -> ModelSpec:
        return self.base.spec

    @property
    def kernels(self) -> str:
        """For the startup line: which CPU kernels the forward runs (engine.cpu_kernels)."""
        return "fused CPU kernels" if self._forward.lora.kernel is not None else "PyTorch ops"

    @property
    def queued_rows(self) -> int:
        return self._batcher.queued_rows

    def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        self._thread.shutdown()

    async def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        """Layered checks: empty text, then characters (cheap), then tokens."""
        char_limit = self.max_tokens * MAX_CHARS_PER_TOKEN
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{i}] is empty; every text needs at least one non-space character")
            if len(text) > char_limit and not truncate:
                raise InputTooLong(
                    f"texts[{i}] has {len(text)} characters, far over the {self.max_tokens}-token limit; "
                    "shorten it or set truncate"
                )
        clipped = [t[:char_limit] for t in texts]
        return await asyncio.to_thread(self._token_ids, clipped, truncate)

    def _token_ids(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encoded = self.base.tokenizer(texts, truncation=truncate, max_length=self.max_tokens if truncate else None)
        ids: list[list[int]] = encoded["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise InputTooLong(
                    f"texts[{i}] has {len(row)} tokens, over the limit of {self.max_tokens}; shorten it or set truncate"
                )
        return ids

    async def run(self, rows: list[Row]) -> list[RowResult]:
        return await self._batcher.submit(rows)

    async def install(
        self, slot: int, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float, head: HeadWeights | None
    ) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._install, slot, lora, scaling, head)

    def _install(
        self, slot: int, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float, head: HeadWeights | None
    ) -> None:
        self._forward.lora.install(slot, lora, scaling)
        if head is None:
            self._forward.heads.clear(slot)
        else:
            self._forward.heads.install(slot, head.weight, head.bias, head.head_input, head.normalize)

    async def clear(self, slot: int) -> None:
        def _clear() -> None:
            self._forward.lora.clear(slot)
            self._forward.heads.clear(slot)

        await asyncio.get_running_loop().run_in_executor(self._executor, _clear)
