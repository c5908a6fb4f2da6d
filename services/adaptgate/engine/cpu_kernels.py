"""Fused CPU kernels (engine/kernels/*.c), built at install time, registered as PyTorch ops `adaptgate::*`.

Hot spots that PyTorch runs as many small ops on the CPU: the per-row LoRA delta (`lora.c` in bf16,
`lora_f32.c` in fp32), attention within each row of packed tokens (`attention.c`), and BERT's residual
add + LayerNorm (`add_norm.c`). setup.py compiles them once into `adaptgate.engine._cpu_kernels`, each
for a fixed instruction set (AVX512-BF16 for the bf16 kernels, AVX2 with FMA for the fp32 one), so every
replica runs the same binary and no node needs a compiler; engine.cpu_features decides which of them
this CPU may call. Without the extension (not built) or on
another CPU the engine runs the PyTorch paths, which are also the references the tests hold these
kernels to.

Each kernel is a torch.library op in the `adaptgate` namespace: the dispatcher checks the argument
types against the schema, and the implementations here check dtypes, shapes and contiguity, while
the extension checks every index the kernel will follow, so a wrong argument is a ValueError in
every mode rather than memory corruption. The ops are defined with torch.library.Library and a
plain Python implementation, the lightest registration (torch.library.custom_op adds its own
per-call layers on top of the dispatcher's). The engine's LoRA layers call the LoRA implementation
directly, with the same checks: it runs once per layer, and each pass through the dispatcher lets go of
the GIL, which the engine thread may then wait for while the event loop holds it.
"""

from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType
from typing import Any

import torch  # first: the extension links libgomp by soname, and must find the one torch loaded
from torch import nn

from adaptgate.engine import cpu_features

log = logging.getLogger(__name__)

EXTENSION = "adaptgate.engine._cpu_kernels"
# The path each operation runs (the adaptgate_engine_kernel_info metric, the startup line): a kernel of this
# module is named by its instruction set (cpu_features.KERNEL_ISA's keys).
FUSED = cpu_features.BF16_KERNELS
FUSED_FP32 = cpu_features.FP32_KERNELS
PREPACKED = "onednn_prepacked"  # engine.prepacked's linears
PYTORCH = "pytorch"
OPERATIONS = ("lora_delta", "packed_attention", "add_layer_norm", "linear")

SCHEMAS = {
    "lora_delta": "lora_delta(Tensor x, Tensor(a!) y, Tensor a, Tensor bv, Tensor tokens, Tensor slots) -> ()",
    "packed_attention": "packed_attention(Tensor q, Tensor k, Tensor v, Tensor starts, Tensor lengths, int longest, int heads) -> Tensor",
    "add_layer_norm": "add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> Tensor",
}


def kernel_rank(max_rank: int) -> int:
    """The LoRA kernel sweeps ranks eight at a time; slots are zero-padded up to that (a zero rank adds nothing)."""
    return -(-max_rank // 8) * 8


class CpuKernelsUnavailable(RuntimeError):
    """Why this engine runs the PyTorch paths instead; `expected` when that is simply this CPU (no kernel's ISA)."""

    def __init__(self, reason: str, expected: bool) -> None:
        super().__init__(reason)
        self.expected = expected


def load_extension(name: str = EXTENSION) -> ModuleType:
    """The compiled extension, found in this package (built at install time; nothing is compiled here)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise CpuKernelsUnavailable(
            f"the extension {name} did not load ({exc}); reinstall the package where a C compiler "
            "with AVX512-BF16 and AVX2 support can build it", expected=False,
        ) from exc  # fmt: skip


def _bad(what: str) -> ValueError:
    return ValueError(f"adaptgate CPU kernel: {what}")


def _size(name: str, t: torch.Tensor, dtype: torch.dtype, dims: int) -> torch.Size:
    """t's size, once checked contiguous with `dims` dimensions of `dtype` (one size() call: these run per layer)."""
    size = t.size()
    if t.dtype != dtype or len(size) != dims or not t.is_contiguous():
        raise _bad(f"{name} must be a contiguous {dims}-D {dtype} tensor, got {t.dtype} {tuple(size)}")
    return size


def _lora_delta(ext: ModuleType, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bv: torch.Tensor,
                tokens: torch.Tensor, slots: torch.Tensor) -> None:  # fmt: skip
    """bf16: bv is B with rank pairs interleaved, [slots, rank/2, out, 2]; fp32 (x's dtype decides): B, [slots, rank, out]."""
    dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    (rows, fan_in), (y_rows, fan_out) = _size("x", x, dtype, 2), _size("y", y, dtype, 2)
    n_slots, rank, a_in = _size("a", a, dtype, 3)
    b_size = _size("bv", bv, dtype, 3 if dtype == torch.float32 else 4)
    (n,), (n_slot_indices,) = _size("tokens", tokens, torch.int64, 1), _size("slots", slots, torch.int64, 1)
    if y_rows != rows or n_slot_indices != n:
        raise _bad(f"x [{rows}, ...] and y [{y_rows}, ...] need one row per token, tokens [{n}] and slots [{n_slot_indices}] one length")
    if dtype == torch.float32:
        if a_in != fan_in or b_size != (n_slots, rank, fan_out):
            raise _bad(f"a must be [slots, rank, {fan_in}] and b [slots, rank, {fan_out}], got {tuple(a.size())} and {tuple(b_size)}")
    elif a_in != fan_in or b_size != (n_slots, rank // 2, fan_out, 2):
        raise _bad(f"a must be [slots, rank, {fan_in}] and bv [slots, rank/2, {fan_out}, 2], got {tuple(a.size())} and {tuple(b_size)}")
    ext.lora_delta(
        x.data_ptr(), y.data_ptr(), a.data_ptr(), bv.data_ptr(), tokens.data_ptr(), slots.data_ptr(),
        n, fan_in, fan_out, rank, rows, n_slots, int(dtype == torch.float32),
    )  # fmt: skip


def _packed_attention(ext: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                      lengths: torch.Tensor, longest: int, heads: int) -> torch.Tensor:  # fmt: skip
    bf16 = torch.bfloat16
    size = _size("q", q, bf16, 2)
    if _size("k", k, bf16, 2) != size or _size("v", v, bf16, 2) != size:
        raise _bad("packed attention takes q, k, v of one shape")
    (rows,) = _size("starts", starts, torch.int64, 1)
    if _size("lengths", lengths, torch.int64, 1) != (rows,):
        raise _bad("starts and lengths need one entry per row")
    tokens, width = size
    if heads <= 0 or width % heads or (width // heads) % 2:
        raise _bad(f"head size {width}/{heads} must be an even integer")
    out = torch.empty_like(q)
    ext.packed_attention(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(), lengths.data_ptr(),
        rows, heads, width // heads, longest, tokens,
    )  # fmt: skip
    return out


def _add_layer_norm(ext: ModuleType, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:  # fmt: skip
    bf16 = torch.bfloat16
    size = _size("x", x, bf16, 2)
    if _size("residual", residual, bf16, 2) != size:
        raise _bad(f"residual {tuple(residual.size())} must match x {tuple(size)}")
    rows, hidden = size
    if _size("weight", weight, bf16, 1) != (hidden,) or _size("bias", bias, bf16, 1) != (hidden,):
        raise _bad(f"weight and bias must be [{hidden}], got {tuple(weight.size())} and {tuple(bias.size())}")
    out = torch.empty_like(x)
    ext.add_layer_norm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(), rows, hidden, eps)
    return out


@functools.cache
def _library(ext: ModuleType) -> torch.library.Library:
    """Defines and implements the ops once per process; the cache keeps the registration alive."""
    library = torch.library.Library("adaptgate", "FRAGMENT")  # FRAGMENT: other modules may add ops to the namespace
    implementations = {"lora_delta": _lora_delta, "packed_attention": _packed_attention, "add_layer_norm": _add_layer_norm}
    for name, schema in SCHEMAS.items():
        library.define(schema)
        library.impl(name, functools.partial(implementations[name], ext), "CPU")
    return library


def ops(ext: ModuleType | None = None) -> Any:
    """`torch.ops.adaptgate`, its ops registered (they validate on any CPU, but run only once `enable`d)."""
    _library(ext or load_extension())
    return torch.ops.adaptgate


class CpuKernels:
    """The fused kernels as the engine calls them; every call runs on the calling thread's OpenMP team
    (the extension links the libgomp torch already loaded: one runtime, see engine.thread)."""

    def __init__(self, ext: ModuleType, isas: tuple[str, ...]) -> None:
        self._ext = ext
        self.isas = isas  # the instruction sets enabled (cpu_features.KERNEL_ISA's keys)
        self._ops = ops(ext)
        self.max_rank = int(ext.MAX_RANK)
        self.max_hidden = int(ext.MAX_HIDDEN)

    @classmethod
    def load(cls, flags: frozenset[str] | None = None, extension: str = EXTENSION) -> CpuKernels:
        """The kernels of every instruction set this CPU has, when it has one and the extension was built;
        else raises. flags: the CPU's (engine.cpu_features reads them by default)."""
        isas = cpu_features.kernel_isas(flags)
        if not isas:
            missing = {isa: cpu_features.missing_kernel_isa(flags, isa) for isa in cpu_features.KERNEL_ISA}
            raise CpuKernelsUnavailable("this CPU lacks " + " and ".join(", ".join(m) for m in missing.values()), expected=True)
        ext = load_extension(extension)
        bits = {FUSED: ext.ISA_AVX512_BF16, FUSED_FP32: ext.ISA_AVX2_FMA}
        ext.enable(sum(bits[isa] for isa in isas))
        return cls(ext, isas)

    @classmethod
    def try_load(cls, flags: frozenset[str] | None = None, extension: str = EXTENSION) -> CpuKernels | None:
        """load(), or None with the reason logged: INFO for a CPU without any kernel's ISA, WARNING for a load failure."""
        try:
            kernels = cls.load(flags, extension)
        except CpuKernelsUnavailable as exc:
            level = logging.INFO if exc.expected else logging.WARNING
            log.log(level, "LoRA, packed attention and add+LayerNorm on CPU run as PyTorch ops: %s", exc)
            return None
        if kernels.runs_bf16:
            log.info("LoRA, packed attention and add+LayerNorm on CPU run the fused kernels (%s)", ", ".join(kernels.isas))
        else:
            log.info("fp32 LoRA on CPU runs the fused AVX2 kernel; packed attention and add+LayerNorm run as PyTorch "
                     "ops: this CPU lacks %s", ", ".join(cpu_features.missing_kernel_isa(flags)))  # fmt: skip
        return kernels

    def threads(self) -> int:
        """The OpenMP threads a call from this thread would use (torch's count when they share libgomp)."""
        return int(self._ext.threads())

    @property
    def runs_bf16(self) -> bool:
        """Whether the bf16 kernels (LoRA, packed attention, add+LayerNorm) run here."""
        return FUSED in self.isas

    def lora_path(self, dtype: torch.dtype, device: torch.device, rank: int) -> str:
        """The kernel that adds LoRA deltas for this dtype (its ISA name), or PYTORCH where none does."""
        isa = {torch.bfloat16: FUSED, torch.float32: FUSED_FP32}.get(dtype)
        fits = device.type == "cpu" and kernel_rank(rank) <= self.max_rank
        return isa if fits and isa in self.isas else PYTORCH

    def supports_lora(self, dtype: torch.dtype, device: torch.device, rank: int) -> bool:
        return self.lora_path(dtype, device, rank) != PYTORCH

    def lora_delta(
        self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bv: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """y[t] += (x[t]·A[s]ᵀ)·B[s] in place. x [T, in], y [T, out], a [S, r, in] (r a multiple of 8), and in
        bf16 bv [S, r/2, out, 2], in fp32 B itself [S, r, out], all contiguous on the CPU; tokens, slots [n]
        int64 within range (checked). The engine calls this once per LoRA layer, so it calls the op's
        implementation itself, with the same checks: through the dispatcher each call would also let go of
        the GIL and wait to take it back from the event loop."""
        _lora_delta(self._ext, x, y, a, bv, tokens, slots)

    def packed_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, int], heads: int
    ) -> torch.Tensor:
        """Softmax(q·kᵀ/√d)·v within each row of packed tokens: q, k, v [T, heads·d] bf16; `rows` holds the
        rows' starts and lengths ([rows] int64, in order, contiguous) and the longest length. Tokens past
        the last row (a bucket's filler) come back zero."""
        starts, lengths, longest = rows
        return self._ops.packed_attention(q, k, v, starts, lengths, longest, heads)

    def add_layer_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor | None:
        """`norm(x + residual)` for contiguous bf16 [T, H] x and residual, the sum kept in fp32; None where
        the kernel does not apply (other dtypes or layouts, no affine weights, H over the kernel's scratch)."""
        weight, bias = norm.weight, norm.bias
        if (
            x.dtype != torch.bfloat16 or residual.shape != x.shape or residual.dtype != x.dtype or x.dim() != 2
            or not (x.is_contiguous() and residual.is_contiguous()) or weight is None or bias is None
            or weight.dtype != x.dtype or bias.dtype != x.dtype or tuple(norm.normalized_shape) != (x.shape[1],)
            or x.shape[1] > self.max_hidden
        ):  # fmt: skip
            return None
        return self._ops.add_layer_norm(x, residual, weight, bias, norm.eps)


def operation_paths(lora: str, attention: bool, linears: bool) -> dict[str, str]:
    """Which path each operation of the CPU forward runs: lora_delta the kernel `lora` names (or PYTORCH),
    packed_attention and add_layer_norm the bf16 kernels or PyTorch's ops, linear oneDNN-prepacked weights
    or plain F.linear."""
    return {
        "lora_delta": lora,
        "packed_attention": FUSED if attention else PYTORCH,
        "add_layer_norm": FUSED if attention else PYTORCH,
        "linear": PREPACKED if linears else PYTORCH,
    }
