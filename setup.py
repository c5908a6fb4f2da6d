"""The optional compiled part of adaptgate: the fused CPU kernels (services/adaptgate/engine/kernels/).

Everything else is declared in pyproject.toml. The kernels are built once, here, at install or image-build
time, for explicit instruction sets (KERNEL_ISA_FLAGS, which engine/cpu_features.py's KERNEL_ISA
mirrors) rather than for the build machine's CPU: every replica then runs the same binary, and the
serving node needs no compiler. The engine checks the CPU it runs on before calling them.

The extension is optional: where it cannot be built (no C compiler, no Python headers, a compiler
without AVX512-BF16 support, not x86-64) the install still succeeds with a warning, and the engine runs
its PyTorch paths.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = Path("services/adaptgate/engine/kernels")
# Each kernel source with the instruction set it is compiled for; module.c (the Python glue) is compiled
# without any of them, so importing the extension never executes an instruction this CPU may lack.
KERNEL_ISA_FLAGS = {
    "avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
    "avx2_fma": ["-mavx2", "-mfma"],
}
KERNEL_SOURCES = {
    str(KERNELS / "lora.c"): "avx512_bf16",
    str(KERNELS / "attention.c"): "avx512_bf16",
    str(KERNELS / "add_norm.c"): "avx512_bf16",
    str(KERNELS / "lora_f32.c"): "avx2_fma",
}
GLUE_SOURCES = [str(KERNELS / "module.c"), str(KERNELS / "lora_tokens.c")]  # no ISA flags: run on any x86-64
# -fopenmp links libgomp.so.1 by soname: the one torch loaded (torch is imported first) serves both.
COMMON_FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden"]


class OptionalKernels(build_ext):
    """build_ext that compiles each kernel source with its ISA flags and turns any failure into a warning."""

    def build_extension(self, ext: Extension) -> None:
        try:
            objects = [
                obj
                for source in ext.sources
                if source in KERNEL_SOURCES
                for obj in self.compiler.compile(
                    [source], output_dir=self.build_temp, extra_postargs=[*COMMON_FLAGS, *KERNEL_ISA_FLAGS[KERNEL_SOURCES[source]]],
                    depends=ext.depends, debug=self.debug,
                )
            ]  # fmt: skip
            ext.sources = [s for s in ext.sources if s not in KERNEL_SOURCES]
            ext.extra_objects = [*ext.extra_objects, *objects]
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - any build failure leaves the PyTorch paths, never a failed install
            self.warn(f"the fused CPU kernels were not built ({exc}); the engine will run PyTorch ops on the CPU")
            print(f"WARNING: adaptgate's fused CPU kernels were not built: {exc}", file=sys.stderr)


def extensions() -> list[Extension]:
    if platform.machine().lower() not in ("x86_64", "amd64") or sys.platform == "win32":
        print("WARNING: adaptgate's fused CPU kernels are x86-64 Linux/macOS only; not built here", file=sys.stderr)
        return []
    return [
        Extension(
            "adaptgate.engine._cpu_kernels",
            sources=[*GLUE_SOURCES, *KERNEL_SOURCES],  # the keys: the kernel sources
            depends=[str(KERNELS / "kernels.h")],
            extra_compile_args=COMMON_FLAGS,
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalKernels})
