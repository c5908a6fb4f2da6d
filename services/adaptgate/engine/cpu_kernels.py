"""Fused CPU kernels (engine/kernels/*.c): compiled for this CPU when the engine starts, PyTorch ops otherwise.

Hot spots that PyTorch runs as many small ops on the CPU: the per-row LoRA delta (`lora.c`),
attention within each row of packed tokens (`attention.c`), and BERT's residual add + LayerNorm
(`add_norm.c`). Compiling at start-up, as torch.compile's C++ backend does, lets `-march=native`
pick this machine's vector instructions; it takes about 0.3 s with gcc. Without a compiler, or on a CPU without AVX512-BF16, the engine keeps the PyTorch paths,
which are also the references the tests hold these kernels to.
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
from torch import nn

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("kernels") / name for name in ("lora.c", "attention.c", "add_norm.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def kernel_rank(max_rank: int) -> int:
    """The LoRA kernel sweeps ranks eight at a time; slots are zero-padded up to that (a zero rank adds nothing)."""
    return -(-max_rank // 8) * 8


class CpuKernelsUnavailable(RuntimeError):
    """Why this machine runs the PyTorch paths instead (no compiler, no AVX512-BF16, ...)."""


def cpu_has_avx512_bf16() -> bool:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in info.splitlines())


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compile(target: Path) -> None:
    cc = compiler()
    if cc is None:
        raise CpuKernelsUnavailable("no C compiler (cc or gcc) on PATH")
    done = subprocess.run([cc, *FLAGS, "-o", str(target), *map(str, SOURCES), "-lm"], capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
        raise CpuKernelsUnavailable(f"{Path(cc).name} could not build engine/kernels: {first}")


class CpuKernels:
    """ctypes handles on the compiled kernels; every call runs on the calling thread's OpenMP team
    (the kernels link the libgomp torch already loaded: one runtime, see engine.thread)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.lora_delta_bf16.restype = None
        lib.lora_delta_bf16.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
        lib.packed_attention_bf16.restype = ctypes.c_int
        lib.packed_attention_bf16.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4
        lib.add_layer_norm_bf16.restype = ctypes.c_int
        lib.add_layer_norm_bf16.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float]
        self.max_rank = int(lib.lora_max_rank())

    @classmethod
    def build(cls) -> CpuKernels:
        if not cpu_has_avx512_bf16():
            raise CpuKernelsUnavailable("this CPU has no AVX512-BF16")
        with tempfile.TemporaryDirectory(prefix="adaptgate-kernels-") as tmp:
            target = Path(tmp) / "kernels.so"
            _compile(target)
            return cls(ctypes.CDLL(str(target)))  # the mapping outlives the file

    @classmethod
    def try_build(cls) -> CpuKernels | None:
        try:
            kernels = cls.build()
        except (CpuKernelsUnavailable, OSError) as exc:
            log.info("LoRA and attention on CPU run as PyTorch ops: %s", exc)
            return None
        log.info("LoRA and packed attention on CPU run fused AVX512-BF16 kernels")
        return kernels

    def threads(self) -> int:
        """The OpenMP threads a call from this thread would use (torch's count when they share libgomp)."""
        return int(self._lib.lora_threads())

    def supports_lora(self, dtype: torch.dtype, device: torch.device, rank: int) -> bool:
        return dtype == torch.bfloat16 and device.type == "cpu" and kernel_rank(rank) <= self.max_rank

    def lora_delta(
        self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bv: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """y[t] += (x[t]·A[s]ᵀ)·B[s] in place. x [T, in], y [T, out], a [S, r, in], bv [S, r/2, out, 2] (r a
        multiple of 8), all contiguous bf16 on the CPU; tokens, slots [n] int64 within range. The caller
        (BatchedLoraLinear) builds every one of them so; checking here would cost as much as a small layer's call."""
        self._lib.lora_delta_bf16(
            x.data_ptr(), y.data_ptr(), a.data_ptr(), bv.data_ptr(), tokens.data_ptr(), slots.data_ptr(),
            len(tokens), x.shape[1], y.shape[1], a.shape[1],
        )  # fmt: skip

    def packed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, int], heads: int
    ) -> torch.Tensor:
        """Softmax(q·kᵀ/√d)·v within each row of packed tokens: q, k, v [T, heads·d] bf16; `rows` holds the
        rows' starts and lengths ([rows] int64, in order, contiguous) and the longest length. Tokens past
        the last row (a bucket's filler) come back zero."""
        starts, lengths, longest = rows
        for t in (q, k, v):
            if t.dtype != torch.bfloat16 or not t.is_contiguous() or t.shape != q.shape:
                raise ValueError("packed attention takes contiguous bf16 q, k, v of one shape")
        d = q.shape[1] // heads
        if d % 2 or d * heads != q.shape[1]:
            raise ValueError(f"head size {q.shape[1]}/{heads} must be an even integer")
        out = torch.empty_like(q)
        out[int(starts[-1]) + int(lengths[-1]) :].zero_()
        failed = self._lib.packed_attention_bf16(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(), lengths.data_ptr(),
            len(lengths), heads, d, longest,
        )  # fmt: skip
        if failed:
            raise MemoryError("packed attention could not allocate its scratch buffers")
        return out

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor | None:
        """`norm(x + residual)` for contiguous bf16 [T, H] x and residual, the sum kept in fp32; None where
        the kernel does not apply (other dtypes or layouts, no affine weights, H over 8,192)."""
        weight, bias = norm.weight, norm.bias
        if (
            x.dtype != torch.bfloat16 or residual.shape != x.shape or residual.dtype != x.dtype or x.dim() != 2
            or not (x.is_contiguous() and residual.is_contiguous()) or weight is None or bias is None
            or weight.dtype != x.dtype or bias.dtype != x.dtype or tuple(norm.normalized_shape) != (x.shape[1],)
        ):
            return None
        out = torch.empty_like(x)
        failed = self._lib.add_layer_norm_bf16(
            x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], norm.eps
        )  # fmt: skip
        return None if failed else out
