"""The hot adapter merged into the base weights: batches of that adapter alone run plain linears and get the
same answers; every other batch, and any slot rewritten since, still gets its own exact deltas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from adaptgate.engine.forward import BatchForward
from adaptgate.engine.lora import GatheredBmm, LoraBackend, LoraLayers
from adaptgate.engine.lora.merged import KEEP_FOR, MERGE_AFTER, MergeStats
from adaptgate.engine.model import load_base_model
from adaptgate.engine.rows import Row
from adaptgate.metrics import Metrics

FAN_IN, FAN_OUT, RANK, SCALING = 24, 40, 4, 2.0
CPU = torch.device("cpu")


def _backends() -> list[LoraBackend]:
    """Every fp32 backend this machine runs: the gathered bmm, and the AVX2 kernel where the CPU has it."""
    from adaptgate.engine.cpu_kernels import CpuKernels
    from adaptgate.engine.lora.cpu_kernel import CpuKernel

    kernels = CpuKernels.try_load()
    fused = kernels is not None and kernels.supports_lora(torch.float32, CPU, 8)
    return [GatheredBmm()] + ([CpuKernel(kernels, torch.float32)] if fused and kernels is not None else [])


def _adapter(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, FAN_IN, generator=gen), torch.randn(FAN_OUT, RANK, generator=gen)


def _layers(backend: LoraBackend, dtype: torch.dtype = torch.float32, merge: bool = True) -> LoraLayers:
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(FAN_IN, FAN_OUT)}).to(dtype)
    layers = LoraLayers(model, n_slots=3, max_rank=8, backend=backend, merge=merge)
    for slot in range(3):
        layers.install(slot, {"proj": _adapter(slot)}, SCALING)
    return layers


def _exact(layers: LoraLayers, x: torch.Tensor, row_slots: list[int], adapters: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    with torch.no_grad():
        y = layers.layers["proj"].base(x).double()
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            a, b = adapters[slot]
            y[row] += SCALING * (x[row].double() @ a.double().t()) @ b.double().t()
    return y


def _run(layers: LoraLayers, x: torch.Tensor, row_slots: list[int]) -> torch.Tensor:
    layers.prepare(row_slots, CPU)
    try:
        with torch.inference_mode():
            return layers.model["proj"](x).double()
    finally:
        layers.prepare([], CPU)


def _x(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 5, FAN_IN, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.name)
def test_an_adapter_carrying_batch_after_batch_is_merged_with_the_same_answers(backend: LoraBackend) -> None:
    layers, x = _layers(backend), _x()
    adapters = {slot: _adapter(slot) for slot in range(3)}
    exact = _exact(layers, x, [1, 1, 1], adapters)
    for _ in range(MERGE_AFTER - 1):
        torch.testing.assert_close(_run(layers, x, [1, 1, 1]), exact, rtol=1e-5, atol=1e-4)
    assert layers.merged_slot is None
    merged = _run(layers, x, [1, 1, 1])
    assert layers.merged_slot == 1
    torch.testing.assert_close(merged, exact, rtol=1e-5, atol=1e-4)
    assert layers.backend.mapping is None  # dropped after the forward; the merged batch never handed it one


@pytest.mark.parametrize("row_slots", [[1, -1, 1], [1, 0, 1]], ids=["a row without adapter", "another adapter"])
def test_batches_not_all_of_the_merged_adapter_keep_their_own_deltas(row_slots: list[int]) -> None:
    layers, x = _layers(GatheredBmm()), _x()
    for _ in range(MERGE_AFTER):
        _run(layers, x, [1, 1, 1])
    assert layers.merged_slot == 1
    got = _run(layers, x, row_slots)
    exact = _exact(layers, x, row_slots, {slot: _adapter(slot) for slot in range(3)})
    torch.testing.assert_close(got, exact, rtol=1e-5, atol=1e-4)
    assert layers.merged_slot == 1  # a mixed batch neither unmerges nor remerges


def test_a_merged_slot_rewritten_serves_its_new_adapter_at_once() -> None:
    layers, x = _layers(GatheredBmm()), _x()
    for _ in range(MERGE_AFTER):
        _run(layers, x, [2, 2, 2])
    assert layers.merged_slot == 2
    layers.install(2, {"proj": _adapter(9)}, SCALING)  # a hot-swap: the same slot, another adapter
    assert layers.merged_slot is None
    exact = _exact(layers, x, [2, 2, 2], {2: _adapter(9)})
    torch.testing.assert_close(_run(layers, x, [2, 2, 2]), exact, rtol=1e-5, atol=1e-4)
    layers.clear(2)
    assert layers.merged_slot is None
    torch.testing.assert_close(_run(layers, x, [2, 2, 2]), _exact(layers, x, [-1, -1, -1], {}), rtol=1e-5, atol=1e-4)


def test_adapters_taking_turns_do_not_steal_the_merge_until_it_goes_unused() -> None:
    layers, x = _layers(GatheredBmm()), _x()
    for _ in range(MERGE_AFTER):
        _run(layers, x, [0, 0, 0])
    for _ in range(3):  # slot 1 has a streak of its own, but slot 0 keeps coming back
        for _ in range(MERGE_AFTER):
            _run(layers, x, [1, 1, 1])
        _run(layers, x, [0, 0, 0])
        assert layers.merged_slot == 0
    for _ in range(KEEP_FOR):
        _run(layers, x, [1, 1, 1])
    assert layers.merged_slot == 1


def test_operators_see_the_merge_and_the_passes_it_served_on_metrics() -> None:
    layers, x = _layers(GatheredBmm()), _x()
    metrics = Metrics()
    metrics.track_merges(lambda: layers.merge_stats)

    def scrape() -> dict[str, float]:
        text = generate_latest(metrics.registry).decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if "merge" in s.name}

    assert scrape() == {"adaptgate_adapters_merged": 0, "adaptgate_adapter_merges_total": 0, "adaptgate_merged_batches_total": 0}
    for _ in range(MERGE_AFTER + 2):  # merged at the MERGE_AFTER-th pass, which runs merged, and two more
        _run(layers, x, [1, 1, 1])
    _run(layers, x, [1, 0, 1])  # a mixed pass computes deltas
    assert scrape() == {"adaptgate_adapters_merged": 1, "adaptgate_adapter_merges_total": 1, "adaptgate_merged_batches_total": 3}
    layers.install(1, {"proj": _adapter(9)}, SCALING)
    assert layers.merge_stats == MergeStats(merged=0, merges=1, batches=3)


def test_bf16_layers_and_merging_off_always_compute_deltas() -> None:
    x = _x()
    for layers in (_layers(GatheredBmm(), torch.bfloat16), _layers(GatheredBmm(), merge=False)):
        for _ in range(2 * MERGE_AFTER):
            _run(layers, x.to(layers.layers["proj"].base.weight.dtype), [1, 1, 1])
        assert layers.merged_slot is None


def test_the_engine_forward_merges_only_when_asked(tiny_bert_dir: Path) -> None:
    """Through the whole model: embeddings and head probabilities the same merged or not; off never merges."""
    forwards = []
    for merge in (True, False):  # a model each: an engine wraps its model's linears
        base = load_base_model(tiny_bert_dir, dtype="float32", device="cpu")
        forward = BatchForward(base, 2, 8, 2, merge_hot_adapter=merge)
        hidden, gen = base.spec.hidden_size, torch.Generator().manual_seed(3)
        names = [n for n, m in base.model.named_modules() if type(m) is nn.Linear]
        lora = {n: (torch.randn(4, hidden, generator=gen) * 0.1, torch.randn(hidden, 4, generator=gen) * 0.1)
                for n in names if n.endswith(("query", "value"))}
        assert lora
        forward.lora.install(0, lora, 2.0)
        forward.heads.install(0, torch.randn(2, hidden, generator=gen), torch.zeros(2), "mean", False)
        forwards.append(forward)
    ids = [base.tokenizer(t)["input_ids"] for t in ("a merged adapter", "gives the same", "answers")]
    outputs = []
    for forward in forwards:
        for _ in range(MERGE_AFTER + 1):
            results = forward([Row(i, lora_slot=0, head_slots=(0,)) for i in ids])
        outputs.append(results)
    assert forwards[0].lora.merged_slot == 0 and forwards[1].lora.merged_slot is None
    for merged, computed in zip(*outputs):
        torch.testing.assert_close(torch.as_tensor(merged.probabilities[0]), torch.as_tensor(computed.probabilities[0]), rtol=1e-4, atol=1e-5)
