"""What this CPU can run, read once from the operating system: the one place the engine's CPU paths are chosen.

Two optional CPU paths depend on the instruction set, and both ask here rather than probing on their own:

- the fused kernels (engine.cpu_kernels, built ahead of time by setup.py for exactly the instruction sets of
  `KERNEL_ISA`) need every extension of a set before any kernel of that set runs; a CPU without them must
  never call those kernels (an illegal instruction);
- oneDNN's prepacked bf16 linears (engine.prepacked) need AVX512BW, AVX512VL and AVX512DQ, or AVX-NE-CONVERT
  on x86 (oneDNN's own condition for its bf16 matmuls), or BF16 on Arm.

The flags come from /proc/cpuinfo, where Linux lists only what the kernel enabled (an AVX512 CPU whose
OS does not save the wide registers shows no avx512 flags). Elsewhere nothing is listed and both paths
stay off: PyTorch's ops, which are also the references the tests hold these paths to.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The instruction sets setup.py compiles engine/kernels/*.c for (its KERNEL_ISA_FLAGS), as cpuinfo spells their
# extensions; tests/unit/test_cpu_kernels.py holds the two equal.
BF16_KERNELS = "avx512_bf16"  # lora.c, attention.c, add_norm.c: bf16 models
FP32_KERNELS = "avx2_fma"  # lora_f32.c: fp32 models
KERNEL_ISA: dict[str, tuple[str, ...]] = {
    BF16_KERNELS: ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
    FP32_KERNELS: ("avx2", "fma"),
}
ONEDNN_BF16_ISA_X86 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))
ONEDNN_BF16_ISA_ARM = (("bf16",),)


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The first processor's `flags` (x86) or `Features` (Arm) line of a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's instruction-set flags as the OS reports them; empty where it reports none."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def missing_kernel_isa(flags: frozenset[str] | None = None, isa: str = BF16_KERNELS) -> tuple[str, ...]:
    """The extensions of one of KERNEL_ISA's sets this CPU lacks (empty: that set's kernels may run)."""
    have = cpu_flags() if flags is None else flags
    return tuple(name for name in KERNEL_ISA[isa] if name not in have)


def kernel_isas(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The instruction sets of KERNEL_ISA whose kernels this CPU runs."""
    return tuple(isa for isa in KERNEL_ISA if not missing_kernel_isa(flags, isa))


def onednn_bf16(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether oneDNN runs bf16 matmuls natively here, so prepacked bf16 linears pay off."""
    have = cpu_flags() if flags is None else flags
    arch = (machine or platform.machine()).lower()
    alternatives = ONEDNN_BF16_ISA_ARM if arch in ("aarch64", "arm64") else ONEDNN_BF16_ISA_X86
    return any(all(name in have for name in needed) for needed in alternatives)
