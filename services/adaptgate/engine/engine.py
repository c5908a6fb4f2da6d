"""The engine facade: tokenize (with the model's prompts), batch, run; install adapter weights into slots between batches."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaptgate.engine.batcher import Batcher, BatcherLimits, BatchStats
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.lora.merged import MergeStats
from adaptgate.engine.model import BaseModel, ModelSpec
from adaptgate.engine.rows import Row, RowResult
from adaptgate.engine.thread import EngineThread
from adaptgate.errors import InputTooLong, InvalidArgument

# A token is rarely more than this many characters; longer texts fail before the tokenizer runs.
MAX_CHARS_PER_TOKEN = 32
# Requests this short (in characters, all texts together) are tokenized on the caller's thread: a hop to
# a worker thread costs more than the tokenizer does on a sentence or two, and it adds a wait for a free
# worker when many requests are in flight. Longer ones go to a thread so the event loop keeps serving.
INLINE_TOKENIZE_CHARS = 2048


@dataclass
class EngineConfig:
    n_slots: int = 64
    max_rank: int = 16
    max_labels: int = 1024
    max_batch_tokens: int = 2048
    max_wait_s: float = 0.002
    max_batch_seconds: float = 0.0  # 0: batches bounded by tokens alone (batcher.BatchBudget)
    max_queue_rows: int = 4096
    max_input_tokens: int = 0  # 0 = the model's own limit
    cpu_kernels: bool = True  # on CPU in bf16: the fused kernels where this CPU runs them (engine.cpu_kernels)
    prepack_linears: bool = True  # on CPU in bf16: oneDNN-prepacked linears where this CPU runs them (engine.prepacked)
    merge_hot_adapter: bool = True  # in fp32: single-adapter batches on that adapter's merged weights (engine.lora.merged)


@dataclass(frozen=True)
class Prompt:
    """A prompt as the engine applies it: `text` goes before each text, as sentence-transformers puts it;
    `pool_skip` leading tokens are then left out of the pooled vector (include_prompt=False), else 0."""

    text: str
    pool_skip: int = 0


NO_PROMPT = Prompt("")


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
            functools.partial(
                BatchForward, cpu_kernels=config.cpu_kernels, prepack=config.prepack_linears,
                merge_hot_adapter=config.merge_hot_adapter,
            ),
            base, config.n_slots, config.max_rank, config.max_labels,
        )  # fmt: skip
        padding_free = self._forward.packed is not None
        limits = BatcherLimits(
            config.max_batch_tokens, config.max_wait_s, config.max_queue_rows, padding_free, config.max_batch_seconds
        )
        self._batcher = Batcher(self._forward, self._executor, limits, on_batch)
        # Measured once here: the tokenizer is not re-configured per request for a prompt's length.
        self._prompts = {name: self._measure(text) for name, text in base.spec.prompts.items()}

    @property
    def spec(self) -> ModelSpec:
        return self.base.spec

    @property
    def kernel_paths(self) -> dict[str, str]:
        """Which path each operation of the forward runs (engine.cpu_kernels.operation_paths)."""
        return dict(self._forward.kernel_paths)

    @property
    def kernels(self) -> str:
        """For the startup line: which path each operation runs."""
        return "paths " + ", ".join(f"{operation}={path}" for operation, path in self._forward.kernel_paths.items())

    @property
    def encoder(self) -> str:
        """For the startup line: padding-free on packed tokens, or the family's padded transformers forward
        and why (engine.packed's registry); and how LoRA deltas are computed (engine.lora's backend)."""
        return f"{self._forward.encoder_path.description}, LoRA by {self._forward.lora.path}"

    @property
    def queued_rows(self) -> int:
        return self._batcher.queued_rows

    @property
    def merge_stats(self) -> MergeStats:
        """The hot adapter merged into the base weights' copy (engine.lora.merged): now, and how often."""
        return self._forward.lora.merge_stats

    def _measure(self, text: str) -> Prompt:
        """sentence-transformers' prompt length: the prompt tokenized alone (cut at the token limit), less a
        trailing special token (BERT's [SEP]), so the leading [CLS] counts as the prompt's too."""
        if not text or self.base.spec.include_prompt:
            return Prompt(text)
        tokenizer = self.base.tokenizer
        ids = tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]
        trailing_special = bool(ids) and ids[-1] in tokenizer.all_special_ids
        return Prompt(text, len(ids) - int(trailing_special))

    def prompt(self, name: str | None) -> Prompt:
        """The prompt a request gets: the one it names; the model's default_prompt_name when it names none
        (None); no prompt for "" (so a request can opt out of a default)."""
        chosen = self.spec.default_prompt_name if name is None else name
        if not chosen:
            return NO_PROMPT
        if chosen not in self._prompts:
            raise InvalidArgument(
                f"prompt_name {chosen!r} is not a prompt of this model; its prompts are {', '.join(sorted(self._prompts))}"
            )
        return self._prompts[chosen]

    def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        self._thread.shutdown()

    async def tokenize(self, texts: list[str], truncate: bool, prompt: str = "") -> list[list[int]]:
        """Layered checks: empty text, then characters (cheap), then tokens. `prompt` goes before each text
        (after the checks, which judge the client's own text), and its tokens count toward the limit."""
        char_limit = self.max_tokens * MAX_CHARS_PER_TOKEN
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{i}] is empty; every text needs at least one non-space character")
            if len(prompt) + len(text) > char_limit and not truncate:
                raise InputTooLong(
                    f"texts[{i}] has {len(text)} characters, far over the {self.max_tokens}-token limit; "
                    "shorten it or set truncate"
                )
        clipped = [(prompt + t)[:char_limit] for t in texts]
        if sum(map(len, clipped)) <= INLINE_TOKENIZE_CHARS:
            return self._token_ids(clipped, truncate, bool(prompt))
        return await asyncio.to_thread(self._token_ids, clipped, truncate, bool(prompt))

    def _token_ids(self, texts: list[str], truncate: bool, prompted: bool = False) -> list[list[int]]:
        encoded = self.base.tokenizer(texts, truncation=truncate, max_length=self.max_tokens if truncate else None)
        ids: list[list[int]] = encoded["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.max_tokens:
                raise InputTooLong(
                    f"texts[{i}] has {len(row)} tokens{' with its prompt' if prompted else ''}, over the limit of "
                    f"{self.max_tokens}; shorten it or set truncate"
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
