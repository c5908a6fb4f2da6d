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


def test_serving_shortens_the_gil_switch_interval_and_gives_it_back() -> None:
    """The engine thread needs the GIL after every op: while it serves, the loop may keep it 0.5 ms, not 5."""
    import sys

    from adaptgate.settings import Settings

    before = sys.getswitchinterval()
    thread = EngineThread(threads=1, switch_interval_ms=Settings().gil_switch_interval_ms)
    try:
        assert sys.getswitchinterval() == 0.0005
    finally:
        thread.shutdown()
    assert sys.getswitchinterval() == before
    EngineThread(threads=1, switch_interval_ms=0).shutdown()  # 0: Python's own, untouched
    assert sys.getswitchinterval() == before
