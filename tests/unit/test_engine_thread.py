"""The engine thread keeps its torch threads; every other thread falls back to one (engine.thread)."""

from __future__ import annotations

import threading

import torch

from adaptgate.engine.thread import EngineThread


def _count_on_a_new_thread() -> int:
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


def test_engine_thread_keeps_its_threads_and_side_threads_get_one() -> None:
    thread = EngineThread(threads=2)
    try:
        assert thread.call(torch.get_num_threads) == 2
        assert _count_on_a_new_thread() == 1  # an adapter check on a side thread runs inline, no OpenMP team
        torch.ones(1_000_000).sum()  # a parallel-sized op elsewhere does not take the engine's threads
        assert thread.call(torch.get_num_threads) == 2
    finally:
        thread.shutdown()
