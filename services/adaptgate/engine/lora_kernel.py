"""The fused CPU LoRA kernel (lora_cpu.c): compiled for this CPU when the engine starts, plain bmm otherwise.

Compiling at start-up, like torch.compile's C++ backend does, lets `-march=native` pick this machine's
vector instructions, and takes about 0.2 s with gcc. No compiler, or a CPU without AVX512-BF16, and
the engine keeps the PyTorch path (`BatchedLoraLinear`'s gathered bmm), which is also the reference
the tests hold this kernel to.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def kernel_rank(max_rank: int) -> int:
    """The kernel sweeps ranks eight at a time; slots are zero-padded up to that (a zero rank adds nothing)."""
    return -(-max_rank // 8) * 8


class LoraKernelUnavailable(RuntimeError):
    """Why this machine runs the PyTorch path instead (no compiler, no AVX512-BF16, ...)."""


def cpu_has_avx512_bf16() -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in info.splitlines())


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compile(source: Path, target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise LoraKernelUnavailable("no C compiler (cc or gcc) on PATH")
    done = subprocess.run([cc, *FLAGS, "-o", str(target), str(source)], capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
        raise LoraKernelUnavailable(f"{Path(cc).name} could not build {source.name}: {first}")


class LoraKernel:
    """ctypes handle on the compiled kernel; every call runs on the calling thread's OpenMP team."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._lib.lora_delta_bf16.restype = None
        self._lib.lora_delta_bf16.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
        self.max_rank = int(lib.lora_max_rank())

    @classmethod
    def build(cls) -> LoraKernel:
        if not cpu_has_avx512_bf16():
            raise LoraKernelUnavailable("this CPU has no AVX512-BF16")
        with tempfile.TemporaryDirectory(prefix="adaptgate-kernel-") as tmp:
            target = Path(tmp) / "lora_cpu.so"
            _compile(SOURCE, target)
            return cls(ctypes.CDLL(str(target)))  # the mapping outlives the file

    @classmethod
    def try_build(cls) -> LoraKernel | None:
        try:
            kernel = cls.build()
        except (LoraKernelUnavailable, OSError) as exc:
            log.info("LoRA on CPU runs as PyTorch bmm: %s", exc)
            return None
        log.info("LoRA on CPU runs the fused AVX512-BF16 kernel")
        return kernel

    def threads(self) -> int:
        """The OpenMP threads a call from this thread would use (torch's count when they share libgomp)."""
        return int(self._lib.lora_threads())

    def supports(self, dtype: torch.dtype, device: torch.device, rank: int) -> bool:
        return dtype == torch.bfloat16 and device.type == "cpu" and kernel_rank(rank) <= self.max_rank

    def delta(
        self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bv: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """y[t] += (x[t]·A[s]ᵀ)·B[s] in place. x [T, in], y [T, out], a [S, r, in], bv [S, r/2, out, 2] (r a
        multiple of 8), all contiguous bf16 on the CPU; tokens, slots [n] int64 within range. The caller (BatchedLoraLinear)
        builds every one of them so; checking here would cost as much as a small layer's call."""
        self._lib.lora_delta_bf16(
            x.data_ptr(), y.data_ptr(), a.data_ptr(), bv.data_ptr(), tokens.data_ptr(), slots.data_ptr(),
            len(tokens), x.shape[1], y.shape[1], a.shape[1],
        )  # fmt: skip
