"""The fused CPU kernels give the PyTorch paths' answers, and the engine falls back when they cannot build."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adaptgate.adapters.validation import AdapterValidator
from adaptgate.engine.forward import BatchForward
from adaptgate.engine.lora import LoraLayers
from adaptgate.engine.cpu_kernels import CpuKernels, compiler, cpu_has_avx512_bf16
from adaptgate.engine.model import load_base_model
from adaptgate.engine.packed import Packing, PackedBertEncoder, row_spans
from adaptgate.engine.pooling import Pooling
from adaptgate.engine.rows import Row
from tests.unit.peft_adapters import adapter_files, make_peft_adapter


@pytest.fixture(scope="module")
def kernel() -> CpuKernels:
    """Skipped only where it cannot exist; a kernel that fails to build on a capable machine fails the tests."""
    if not cpu_has_avx512_bf16() or compiler() is None:
        pytest.skip("no AVX512-BF16 CPU or no C compiler here")
    return CpuKernels.build()


def _layers(fan_in: int, fan_out: int, rank: int, kernel: CpuKernels | None, adapters: list[tuple[torch.Tensor, torch.Tensor]]) -> LoraLayers:
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(fan_in, fan_out)}).to(torch.bfloat16)
    layers = LoraLayers(model, n_slots=len(adapters), max_rank=rank, kernel=kernel)
    for slot, (a, b) in enumerate(adapters):
        layers.install(slot, {"proj": (a, b)}, scaling=2.0)
    return layers


def _adapters(fan_in: int, fan_out: int, ranks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(r, fan_in, generator=gen) * 0.3, torch.randn(fan_out, r, generator=gen) * 0.3) for r in ranks]


def _exact(x: torch.Tensor, layers: LoraLayers, adapters, row_of: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    """fp32 reference: the bf16 base output plus each token's delta, computed exactly."""
    with torch.no_grad():
        y = layers.model["proj"].base(x).float()
    for i, row in enumerate(row_of.tolist()):
        slot = row_slots[row]
        if slot >= 0:
            a, b = adapters[slot]
            y[i] += 2.0 * (x[i].float() @ a.bfloat16().float().t()) @ b.float().t()
    return y


@pytest.mark.parametrize(("fan_in", "fan_out"), [(384, 1536), (40, 24), (1536, 384)])
@pytest.mark.parametrize("row_slots", [[0, -1, 1, 2, -1], [2, 0, 1, 1, 0]])
def test_kernel_matches_the_bmm_path_padded(kernel: CpuKernels, fan_in: int, fan_out: int, row_slots: list[int]) -> None:
    adapters = _adapters(fan_in, fan_out, [8, 3, 12])  # r_max 12: the kernel pads slots to 16, ranks 3 and 8 to that
    x = torch.randn(len(row_slots), 7, fan_in).bfloat16()
    outputs = []
    for k in (kernel, None):
        layers = _layers(fan_in, fan_out, 12, k, adapters)
        assert (layers.kernel is not None) == (k is not None)
        layers.bind(row_slots, torch.device("cpu"))
        with torch.inference_mode():
            outputs.append(layers.model["proj"](x).float())
    exact = _exact(x.view(-1, fan_in), layers, adapters, torch.arange(len(row_slots)).repeat_interleave(7), row_slots)
    fused, bmm = (o.view(-1, fan_out) for o in outputs)
    scale = exact.abs().max()
    assert (fused - exact).abs().max() <= (bmm - exact).abs().max() + 1e-2 * scale  # one rounding, not three
    torch.testing.assert_close(fused, bmm, atol=3e-2 * float(scale), rtol=0)
    assert (fused - layers.model["proj"].base(x).float().view(-1, fan_out)).abs().max() > 1e-2 * scale  # LoRA did act


def test_kernel_matches_the_bmm_path_on_packed_tokens(kernel: CpuKernels) -> None:
    lengths, row_slots = [3, 9, 1, 6], [1, -1, 0, 1]
    mask = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    adapters = _adapters(64, 96, [4, 8])
    packed = torch.randn(Packing.from_mask(mask).gather.numel(), 64).bfloat16()  # real tokens and the bucket's filler
    outputs = []
    for k in (kernel, None):
        layers = _layers(64, 96, 8, k, adapters)
        layers.bind(row_slots, torch.device("cpu"))
        layers.batch.packing = Packing.from_mask(mask)
        with torch.inference_mode():
            outputs.append(layers.model["proj"](packed.clone()).float()[: sum(lengths)])
    row_of = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    exact = _exact(packed[: sum(lengths)], layers, adapters, row_of, row_slots)
    torch.testing.assert_close(outputs[0], outputs[1], atol=3e-2 * float(exact.abs().max()), rtol=0)
    no_lora = row_of == 1
    torch.testing.assert_close(outputs[0][no_lora], exact[no_lora], atol=0, rtol=0)  # a row without an adapter is untouched


def test_kernel_runs_on_the_callers_torch_threads(kernel: CpuKernels) -> None:
    """One OpenMP runtime (torch's libgomp): the kernel adds no thread team of its own (engine.thread)."""
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert kernel.threads() == torch.get_num_threads() == n
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not cpu_has_avx512_bf16(), reason="the compiler is tried only on a CPU with AVX512-BF16")
def test_engine_keeps_the_bmm_path_when_the_kernel_cannot_build(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.INFO, logger="adaptgate.engine.cpu_kernels"):
        assert CpuKernels.try_build() is None
    assert "PyTorch ops" in caplog.text and "could not build" in caplog.text
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert CpuKernels.try_build() is None


@pytest.mark.parametrize("padding_free", [True, False])
def test_bf16_forward_with_the_kernel_matches_the_bmm_path(
    kernel: CpuKernels, tiny_bert_dir: Path, tmp_path: Path, padding_free: bool
) -> None:
    base = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu")
    make_peft_adapter(tiny_bert_dir, tmp_path, 3, 4, seed=7)
    weights = AdapterValidator(base.spec, max_rank=8, max_labels=4).parse(adapter_files(tmp_path))
    ids = base.tokenizer(["hi", "a much longer message about the weekly competition entry", "URGENT! you have won"])["input_ids"]
    results = []
    for use_kernel in (True, False):
        forward = BatchForward(base, n_slots=2, max_rank=8, max_labels=4, padding_free=padding_free, cpu_kernels=use_kernel)
        forward.lora.install(1, weights.lora, weights.scaling)
        assert forward.lora.layers and all((layer.kernel is not None) == use_kernel for layer in forward.lora.layers.values())
        forward.heads.install(1, weights.head_weight, weights.head_bias, weights.head_input, weights.normalize_head_input)
        rows = [Row(i, lora_slot=s, head_slots=(1,) if s == 1 else (), pooling=Pooling.MEAN) for i, s in zip(ids, [1, -1, 1])]
        results.append(forward(rows))
    for ours, theirs in zip(*results):
        assert float(np.dot(ours.embedding, theirs.embedding)) > 0.999
        for p, q in zip(ours.probabilities, theirs.probabilities):
            np.testing.assert_allclose(p, q, atol=2e-2)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], heads: int) -> torch.Tensor:
    """fp32 softmax attention row by row, from the bf16 inputs."""
    out, start = torch.zeros(q.shape), 0
    for n in lengths:
        rows = slice(start, start + n)
        split = [t[rows].float().view(n, heads, -1).transpose(0, 1) for t in (q, k, v)]  # [heads, n, d]
        context = torch.nn.functional.scaled_dot_product_attention(*split)
        out[rows] = context.transpose(0, 1).reshape(n, -1)
        start += n
    return out


@pytest.mark.parametrize(("lengths", "heads", "dim"), [([3, 17, 1, 16, 40], 12, 384), ([130, 2], 4, 256), ([5, 9], 2, 20)])
def test_packed_attention_matches_fp32_attention_row_by_row(kernel: CpuKernels, lengths: list[int], heads: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(3)
    total = sum(lengths) + 5  # and a bucket's filler
    q, k, v = (torch.randn(total, dim, generator=gen).mul(2).bfloat16() for _ in range(3))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    got = kernel.packed_attention(q, k, v, row_spans(mask), heads).float()
    expected = _reference_attention(q, k, v, lengths, heads)
    torch.testing.assert_close(got[: sum(lengths)], expected[: sum(lengths)], atol=2e-2, rtol=1e-2)  # bf16 output rounding
    assert torch.all(got[sum(lengths) :] == 0)
    odd = q[:, :15].contiguous()  # 5 heads of 3
    with pytest.raises(ValueError, match="even"):
        kernel.packed_attention(odd, odd, odd, row_spans(mask), 5)


def test_bf16_packed_encoder_with_the_kernel_matches_transformers(kernel: CpuKernels, tiny_bert_dir: Path) -> None:
    base = load_base_model(tiny_bert_dir, dtype="bfloat16", device="cpu")
    texts = ["hi", "ok", "a much longer message about the weekly competition entry and its many rules", "yes"]
    batch = base.tokenizer(texts, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    with torch.inference_mode():
        expected = base.model(**batch).last_hidden_state.float()
        packing = Packing.from_mask(batch["attention_mask"])
        encoder = PackedBertEncoder(base.model, kernel)
        assert encoder.kernels is kernel
        got = encoder(batch["input_ids"], batch["attention_mask"], packing).last_hidden_state.float()
    cosine = torch.nn.functional.cosine_similarity(got[real], expected[real], dim=-1)
    assert cosine.min() > 0.999


@pytest.mark.parametrize("hidden", [384, 40])  # 40: a masked tail of 8 lanes
def test_add_layer_norm_matches_fp32_layer_norm_of_the_sum(kernel: CpuKernels, hidden: int) -> None:
    gen = torch.Generator().manual_seed(5)
    x, residual = (torch.randn(37, hidden, generator=gen).mul(3).add(1).bfloat16() for _ in range(2))
    norm = nn.LayerNorm(hidden, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2, generator=gen)
        norm.bias.normal_(0, 0.2, generator=gen)
    expected = torch.nn.functional.layer_norm(x.float() + residual.float(), (hidden,), norm.weight, norm.bias, 1e-12)
    got = kernel.add_layer_norm(x, residual, norm.bfloat16())
    assert got is not None and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=1e-2)  # one bf16 rounding of the output
    assert kernel.add_layer_norm(x.float(), residual.float(), norm.float()) is None  # fp32: PyTorch's ops
    assert kernel.add_layer_norm(x.t(), residual.t(), norm) is None  # not row-major [T, H]
