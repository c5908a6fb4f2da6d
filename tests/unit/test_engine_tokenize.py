"""Where a request is tokenized: a short one on the event loop's own thread (a worker-thread hop costs
more than the tokenizer on a sentence), a long one on a worker thread so the loop keeps serving."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from adaptgate.engine.engine import INLINE_TOKENIZE_CHARS, Engine, EngineConfig
from adaptgate.engine.model import load_base_model


@pytest.fixture(scope="module")
def engine(tiny_bert_dir: Path) -> Engine:
    return Engine(load_base_model(tiny_bert_dir, dtype="float32", device="cpu"), EngineConfig(cpu_kernels=False))


def _recording_threads(engine: Engine) -> list[int]:
    threads: list[int] = []
    token_ids = engine._token_ids

    def recording(texts: list[str], truncate: bool, *args: object) -> list[list[int]]:
        threads.append(threading.get_ident())
        return token_ids(texts, truncate, *args)

    engine._token_ids = recording  # type: ignore[method-assign]
    return threads


async def test_a_short_request_is_tokenized_on_the_loop_and_a_long_one_off_it(engine: Engine) -> None:
    threads = _recording_threads(engine)
    short = await engine.tokenize(["a short text", "and another"], truncate=False)
    long_text = "word " * (INLINE_TOKENIZE_CHARS // 5 + 1)
    long = await engine.tokenize([long_text], truncate=True)
    assert threads[0] == threading.get_ident(), "a short request took a thread hop"
    assert threads[1] != threading.get_ident(), "a long request blocked the event loop"
    assert short == engine.base.tokenizer(["a short text", "and another"])["input_ids"]  # the same ids either way
    assert len(long[0]) == engine.max_tokens  # truncated, tokenized all the same
