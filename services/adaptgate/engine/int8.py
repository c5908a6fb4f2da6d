"""Opt-in int8 weights and activations (`--dtype int8`, CPU): W8A8 with SmoothQuant, no calibration data.

Each quantized linear keeps its weight as int8 with one scale per output channel, and quantizes its
input per token (one scale per row), so a row's output never depends on its batch mates, and runs
`torch._int_mm` (int8 x int8 -> int32: VNNI or AMX in oneDNN). BERT-style activations carry a few
channels far larger than the rest; SmoothQuant moves that range into the weight
(`x·W = (x/s)·(s·W)`, s = max|x|^½ / max|W|^½ per input channel). The per-channel maxima come from
one forward over seeded random tokens at load time (the outlier channels are a property of the model,
not of the text). Down projections (in > out: the FFN's second linear, whose inputs follow GELU)
stay in the model's dtype: quantizing them too cost the most accuracy for the least time.

tests/integration/test_precision.py holds the embeddings to a cosine to fp32 of at least 0.99 (min)
and 0.999 (mean). It is opt-in: where bf16 matmuls are already fast (avx512_bf16 without AMX) int8
gains little; it is for CPUs whose int8 units outrun their bf16 ones (AMX doubles the int8 rate).
Measured accuracy and speed: docs/performance.md, Precision.
"""

from __future__ import annotations

import torch
from torch import nn

CALIBRATION_ROWS = 64
CALIBRATION_TOKENS = 32
SMOOTHING_ALPHA = 0.5


class Int8Linear(nn.Module):
    """`x·Wᵀ + b` with int8 weight [out, in] (stored [in, out] for `_int_mm`) and per-token int8 input."""

    def __init__(self, linear: nn.Linear, input_max: torch.Tensor) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        smooth = (input_max.float().clamp(min=1e-5) ** SMOOTHING_ALPHA) / (
            weight.abs().amax(0).clamp(min=1e-5) ** (1 - SMOOTHING_ALPHA)
        )  # [in]
        weight = weight * smooth
        scale = weight.abs().amax(1).clamp(min=1e-8) / 127  # [out]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.register_buffer("inverse_smooth", (1 / smooth), persistent=False)
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(linear.out_features)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float() * self.inverse_smooth  # [n, in]
        scale = rows.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127  # [n, 1]
        quantized = torch.round(rows / scale).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_int8).float() * scale * self.weight_scale + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def _input_maxima(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of each named linear over one forward on seeded random tokens."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).abs().amax(0)
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen

        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 10), vocab, (CALIBRATION_ROWS, CALIBRATION_TOKENS), generator=generator)
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def quantize_linears(model: nn.Module) -> int:
    """Swap every nn.Linear except down projections and the pooler for Int8Linear; returns how many."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module.in_features <= module.out_features and not name.startswith("pooler")
    ]
    maxima = _input_maxima(model, names)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(getattr(parent, child), maxima[name]))
    return len(names)
