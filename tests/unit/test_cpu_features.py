"""One detector picks both optional CPU paths (the fused kernels, oneDNN-prepacked linears) from the CPU's flags."""

from __future__ import annotations

import pytest

from adaptgate.engine import cpu_features
from adaptgate.engine.cpu_features import missing_kernel_isa, onednn_bf16, parse_cpu_flags

ZEN4 = "avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni"
SKYLAKE_X = "avx avx2 fma avx512f avx512dq avx512bw avx512vl"  # AVX512 without BF16
ZEN2 = "avx avx2 fma f16c"
ARROW_LAKE = "avx avx2 fma avx_vnni avx_ne_convert"  # no AVX512, but oneDNN converts bf16 natively


def _cpuinfo(flags: str, key: str = "flags") -> str:
    return f"processor\t: 0\nvendor_id\t: AuthenticAMD\n{key}\t\t: fpu vme {flags}\nbugs\t\t: sysret_ss_attrs\n\nprocessor\t: 1\n{key}\t\t: fpu\n"


@pytest.mark.parametrize(
    ("flags", "kernels", "prepack"),
    [(ZEN4, True, True), (SKYLAKE_X, False, True), (ZEN2, False, False), (ARROW_LAKE, False, True)],
)
def test_each_path_asks_for_its_own_instruction_set(flags: str, kernels: bool, prepack: bool) -> None:
    parsed = parse_cpu_flags(_cpuinfo(flags))
    assert "fpu" in parsed and "sysret_ss_attrs" not in parsed  # the first processor's flags line, nothing else
    assert (not missing_kernel_isa(parsed)) is kernels
    assert onednn_bf16(parsed, machine="x86_64") is prepack


def test_skylake_lacks_only_bf16_and_arm_needs_its_bf16_feature() -> None:
    assert missing_kernel_isa(parse_cpu_flags(_cpuinfo(SKYLAKE_X))) == ("avx512_bf16",)
    arm = parse_cpu_flags(_cpuinfo("asimd sve bf16 i8mm", key="Features"))
    assert onednn_bf16(arm, machine="aarch64") and not onednn_bf16(arm, machine="x86_64")
    bf16 = cpu_features.KERNEL_ISA[cpu_features.BF16_KERNELS]
    assert missing_kernel_isa(arm) == bf16 and cpu_features.kernel_isas(arm) == ()
    assert parse_cpu_flags("") == frozenset() and missing_kernel_isa(frozenset()) == bf16


@pytest.mark.parametrize(
    ("flags", "isas"),
    [(ZEN4, ("avx512_bf16", "avx2_fma")), (SKYLAKE_X, ("avx2_fma",)), (ZEN2, ("avx2_fma",)), ("avx avx2 f16c", ())],
)
def test_fp32_lora_kernel_needs_only_avx2_and_fma(flags: str, isas: tuple[str, ...]) -> None:
    assert cpu_features.kernel_isas(parse_cpu_flags(_cpuinfo(flags))) == isas


def test_the_detector_reads_this_machine_once() -> None:
    assert cpu_features.cpu_flags() is cpu_features.cpu_flags()
