"""The one thread that runs torch's parallel work in a serving process.

PyTorch's OpenMP runtime on Linux (libgomp) keeps a team of worker threads for every thread that
ever ran a parallel region. Once a process holds more OpenMP threads than cores, libgomp stops
spinning between regions and puts the workers to sleep instead, and every matmul then waits for
them to wake: a model loaded on another thread (or a side thread validating an adapter) was enough
to slow every forward (docs/performance.md). So the model is loaded, and every batch run, on this
one thread, and the rest of the process is made single-threaded for torch: a side thread's small
tensor work then runs inline, no new team.

The engine thread also shares the GIL with the event loop. Each torch op releases it, and between ops
the engine thread must take it back; while the loop runs Python (answering requests), CPython lets it
keep the GIL for up to the switch interval (5 ms by default) before handing it over, and the forward
waits that long. `switch_interval_ms` shortens that wait for the whole process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def default_threads() -> int:
    """What torch would pick on its own: OMP_NUM_THREADS, else the cores this process may use."""
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or len(os.sched_getaffinity(0))


def _claim_threads(threads: int) -> int:
    """Fix this thread's count; reading it back completes torch's once-per-thread set-up, which would
    otherwise copy whatever count the process holds at the thread's first parallel op."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


class EngineThread:
    def __init__(self, threads: int = 0, switch_interval_ms: float = 0.0) -> None:
        """switch_interval_ms: the process's GIL switch interval while this thread serves (0: Python's own)."""
        self.threads = threads or default_threads()
        self._switch_interval = sys.getswitchinterval()  # restored at shutdown
        if switch_interval_ms > 0:
            sys.setswitchinterval(switch_interval_ms / 1000)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        claimed = self.call(_claim_threads, self.threads)
        torch.set_num_threads(1)  # threads that first touch torch from now on get one thread (and no team)
        if self.call(torch.get_num_threads) != claimed:
            raise RuntimeError("the engine thread lost its torch threads")

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the engine thread and wait (for set-up: loading the model, building buffers)."""
        return self.executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
        sys.setswitchinterval(self._switch_interval)
