"""Per-call overhead of the ways to expose the fused CPU kernels to PyTorch (engine/cpu_kernels.py).

The engine calls a kernel about 36 times per forward (6 LoRA linears, attention and two add+LayerNorms in
each of 6 layers), so a registration's fixed cost per call matters. This times, with the same
validating body and a trivial C call in place of the kernel (so it runs on any CPU):
the body called directly, an op registered with torch.library.Library + impl (what the engine uses),
and the same op as torch.library.custom_op. Run: .venv/bin/python bench/cpu_kernel_dispatch.py
"""

from __future__ import annotations

import functools
import timeit

import torch

from adaptgate.engine import cpu_kernels

EXT = cpu_kernels.load_extension()


class _Stand:
    """The extension with its kernel replaced by a C call that does nothing (threads())."""

    @staticmethod
    def lora_delta(*args: object) -> None:
        EXT.threads()


def body(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bv: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> None:
    cpu_kernels._lora_delta(_Stand, x, y, a, bv, tokens, slots)  # type: ignore[arg-type]


def main() -> None:
    lib = torch.library.Library("adaptgate_bench", "DEF")
    lib.define(cpu_kernels.SCHEMAS["lora_delta"])
    lib.impl("lora_delta", body, "CPU")

    @torch.library.custom_op("adaptgate_bench2::lora_delta", mutates_args=("y",))
    def custom(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bv: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        body(x, y, a, bv, tokens, slots)

    tokens = torch.arange(900)
    args = (
        torch.zeros(900, 384, dtype=torch.bfloat16), torch.zeros(900, 1536, dtype=torch.bfloat16),
        torch.zeros(64, 16, 384, dtype=torch.bfloat16), torch.zeros(64, 8, 1536, 2, dtype=torch.bfloat16),
        tokens, tokens % 64,
    )  # fmt: skip
    ways = {
        "C call alone (threads())": EXT.threads,
        "validation + C call, direct": functools.partial(body, *args),
        "torch.library.Library + impl": functools.partial(torch.ops.adaptgate_bench.lora_delta, *args),
        "Library + impl, .default overload": functools.partial(torch.ops.adaptgate_bench.lora_delta.default, *args),
        "torch.library.custom_op": functools.partial(torch.ops.adaptgate_bench2.lora_delta, *args),
    }
    with torch.inference_mode():
        for name, call in ways.items():
            best = min(timeit.repeat(call, number=2000, repeat=7)) / 2000
            print(f"{name:32s} {best * 1e6:7.2f} us/call")


if __name__ == "__main__":
    main()
