"""Prepacked linears give F.linear's answers, and the engine's bf16 CPU forward keeps its outputs with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.model import load_base_model
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.prepacked import PrepackedLinear, can_prepack, prepack_linears
from adaptgate.engine.rows import Row
from tests.unit.peft_adapters import adapter_files, make_peft_adapter

pytestmark = pytest.mark.skipif(not can_prepack(), reason="oneDNN cannot prepack bf16 linears here (no oneDNN, or a CPU without AVX512BW/VL/DQ or AVX-NE-CONVERT)")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 48), (3, 5, 48)])
def test_prepacked_linear_is_f_linear_bit_for_bit(bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).bfloat16()
    x = torch.randn(*shape).bfloat16()
    packed = PrepackedLinear(linear)
    with torch.inference_mode():
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))
    assert (packed.in_features, packed.out_features) == (48, 80)
    assert packed.weight.dtype == torch.bfloat16


def test_gelu_epilogue_is_gelu_of_the_linear_within_bf16_rounding() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 256).bfloat16()
    x = torch.randn(100, 64).bfloat16()
    with torch.inference_mode():
        fused = PrepackedLinear(linear)(x, activation="gelu").float()
        expected = F.gelu(F.linear(x.float(), linear.weight.float(), linear.bias.float()))
    torch.testing.assert_close(fused, expected, atol=2e-2, rtol=1e-2)
    assert (fused < 0).any()  # GELU's negative lobe: an exact GELU, not a ReLU


def test_only_the_cpu_bf16_encoder_is_prepacked(tiny_bert_dir: Path) -> None:
    fp32 = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
    assert prepack_linears(fp32.model, fp32.dtype, fp32.device) == 0
    base = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu")
    linears = [n for n, m in base.model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("pooler")]
    assert prepack_linears(base.model, base.dtype, base.device) == len(linears) == 12  # 2 layers x 6
    assert isinstance(base.model.pooler.dense, nn.Linear)  # one row per text: nothing to gain
    assert prepack_linears(base.model, base.dtype, base.device) == 0  # idempotent


def _forward_results(base_dir: Path, adapter_dir: Path, prepack: bool) -> tuple[BatchForward, list]:
    base = load_base_model(base_dir, dtype="bfloat16", device="cpu")
    weights = AdapterValidator(base.spec, max_rank=8, max_labels=4).parse(adapter_files(adapter_dir))
    forward = BatchForward(base, n_slots=2, max_rank=8, max_labels=4, prepack=prepack)
    forward.lora.install(1, weights.lora, weights.scaling)
    forward.heads.install(1, weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
    texts = ["hi", "a much longer message about the weekly competition entry", "URGENT! you have won"]
    rows = [
        Row(ids, lora_slot=slot, head_slots=(1,) if slot == 1 else (), pooling=Pooling.MEAN)
        for ids, slot in zip(base.tokenizer(texts)["input_ids"], [1, -1, 1])
    ]
    return forward, forward(rows)


def test_lora_on_prepacked_linears_matches_the_plain_forward(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Every linear carries LoRA here, the FFN's first one included: its delta must come before GELU."""
    make_peft_adapter(tiny_bert_dir, tmp_path, 3, 4, seed=7)
    packed, ours = _forward_results(tiny_bert_dir, tmp_path, prepack=True)
    plain, theirs = _forward_results(tiny_bert_dir, tmp_path, prepack=False)
    assert isinstance(packed.lora.layers["encoder.layer.0.intermediate.dense"].base, PrepackedLinear)
    assert not any(isinstance(m, PrepackedLinear) for m in plain.base.model.modules())
    for a, b in zip(ours, theirs):
        assert float(np.dot(a.embedding, b.embedding)) > 0.999
        for p, q in zip(a.probabilities, b.probabilities):
            np.testing.assert_allclose(p, q, atol=2e-2)


def test_prepacking_has_its_own_switch(tiny_bert_dir: Path) -> None:
    """ADAPTGATE_CPU_KERNELS=off turns off the fused kernels only; ADAPTGATE_PREPACK_LINEARS=off the prepacking."""
    kernels_off = BatchForward(load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu"), 2, 8, 4, cpu_kernels=False)
    assert any(isinstance(m, PrepackedLinear) for m in kernels_off.base.model.modules())
    assert kernels_off.kernel_paths["linear"] == "onednn_prepacked" and kernels_off.kernel_paths["lora_delta"] == "pytorch"
    prepack_off = BatchForward(load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu"), 2, 8, 4, prepack=False)
    assert not any(isinstance(m, PrepackedLinear) for m in prepack_off.base.model.modules())
    assert prepack_off.kernel_paths["linear"] == "pytorch"
