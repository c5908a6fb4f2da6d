from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adaptgate.engine.model import load_base_model
from adaptgate.training.data.splits import Split, job_split, stratified_split, validation_count
from adaptgate.training.methods.head import HeadParams, TrainingDiverged, label_order, train_head
from adaptgate.training.methods.head_embed import chunk_size
from adaptgate.training.methods.head_fit import FitConfig, fit_linear_head, macro_f1
from adaptgate.training.runners.updates import Update

from .conftest import separable_rows


def test_train_head_learns_a_separable_dataset(tiny_model_dir: Path) -> None:
    rows = separable_rows(40)
    updates: list[Update] = []
    params = HeadParams(seed=1, validation_fraction=0.25, epochs=200, eval_every=50)
    result = train_head([r["text"] for r in rows], [r["label"] for r in rows], str(tiny_model_dir), params, updates.append)
    assert result.weight.shape == (2, 32) and result.bias.shape == (2,)
    assert result.weight.dtype == torch.float32 and result.labels == ["animal", "money"]
    assert result.metrics["accuracy"] >= 0.9 and result.metrics["macro_f1"] >= 0.9
    assert result.fingerprint == load_base_model(tiny_model_dir).spec.fingerprint
    assert result.head_input == "mean" and result.normalize
    kinds = [u["kind"] for u in updates]
    assert kinds[0] == "started" and kinds.count("eval") == 4 and kinds[-1] == "log"
    assert kinds.count("progress") == math.ceil(80 / chunk_size(80, 64))
    progress = [u["progress"] for u in updates]
    assert progress == sorted(progress) and progress[-1] < 1.0


def test_same_seed_same_head(tiny_model_dir: Path) -> None:
    rows = separable_rows(10)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    params = HeadParams(seed=4, epochs=30, eval_every=10)
    a = train_head(texts, labels, str(tiny_model_dir), params, lambda u: None)
    b = train_head(texts, labels, str(tiny_model_dir), params, lambda u: None)
    assert torch.equal(a.weight, b.weight)


def test_split_is_stratified_deterministic_and_keeps_duplicates_together() -> None:
    texts = [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(10)] + ["dup", "dup", "dup"]
    labels = ["a"] * 20 + ["b"] * 10 + ["b"] * 3
    split = stratified_split(texts, labels, 0.2, seed=0)
    assert split == stratified_split(texts, labels, 0.2, seed=0)
    assert split != stratified_split(texts, labels, 0.2, seed=1)
    held = [labels[i] for i in split.validation]
    assert held.count("a") == 4 and held.count("b") in (2, 4)
    dup_sides = {i in split.validation for i in (30, 31, 32)}
    assert len(dup_sides) == 1
    assert sorted(split.train + split.validation) == list(range(33))


def test_validation_count_bounds() -> None:
    assert validation_count(1, 0.5) == 0
    assert validation_count(2, 0.01) == 1
    assert validation_count(3, 0.5) == 2  # round(1.5) == 2, capped at groups - 1
    assert validation_count(100, 0.1) == 10


def _blobs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    y = torch.arange(60) % 3
    return torch.nn.functional.one_hot(y, 3).float() * 3 + 0.1 * torch.randn(60, 3), y


def test_fit_keeps_best_validation_weights_and_reports_evals() -> None:
    x, y = _blobs()
    evals = []
    fitted = fit_linear_head((x, y), (x, y), 3, FitConfig(100, 0.1, 1e-5, 20), evals.append)
    assert [e.step for e in evals] == [20, 40, 60, 80, 100]
    assert fitted.best.loss == min(e.loss for e in evals) and fitted.best.accuracy == 1.0


def test_nan_features_diverge_with_a_clear_message() -> None:
    x, y = _blobs()
    x[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="training diverged: loss became NaN at step 1"):
        fit_linear_head((x, y), (x, y), 3, FitConfig(10, 0.1, 0.0, 5), lambda e: None)


def test_huge_learning_rate_diverges() -> None:
    x, y = _blobs()
    with pytest.raises(TrainingDiverged, match="training diverged: loss became .* at step 2"):
        fit_linear_head((x, y), (x, y), 3, FitConfig(10, 1e30, 1e-5, 5), lambda e: None)


def test_macro_f1_and_label_order() -> None:
    assert macro_f1(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert macro_f1(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1])) == pytest.approx((2 / 3 + 0) / 2)
    assert label_order(["10", "2", "b", "a", "-1"]) == ["-1", "2", "10", "a", "b"]


def test_rows_after_holdout_from_are_the_validation_set(tiny_model_dir: Path) -> None:
    rows, held = separable_rows(20), separable_rows(3)
    texts, labels = [r["text"] for r in rows + held], [r["label"] for r in rows + held]
    assert job_split(texts, labels, 0.5, 0, holdout_from=40) == Split(list(range(40)), list(range(40, 46)))
    updates: list[Update] = []
    params = HeadParams(seed=1, epochs=20, eval_every=10, holdout_from=40)
    result = train_head(texts, labels, str(tiny_model_dir), params, updates.append)
    assert "(40 train, 6 validation)" in updates[0]["message"]
    assert sum(map(sum, result.confusion)) == 6  # scored on the given rows only


def test_out_of_scope_rows_are_not_learnt_and_set_the_abstain_threshold(tiny_model_dir: Path) -> None:
    rows = separable_rows(20) + [{"text": f"weather forecast rain {i} sunny", "label": "none"} for i in range(10)]
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    updates: list[Update] = []
    params = HeadParams(seed=1, epochs=60, eval_every=20, out_of_scope_label="none")
    result = train_head(texts, labels, str(tiny_model_dir), params, updates.append)
    assert result.labels == ["animal", "money", "none"]  # learnt as a class: its answers abstain
    assert result.abstain is not None and result.abstain.label == "none"
    assert 0.0 < result.abstain.threshold < 1.0
    assert {"out_of_scope_recall", "in_scope_precision", "in_scope_accuracy", "abstain_threshold"} <= set(result.metrics)
    assert result.metrics["in_scope_precision"] >= 0.95 and result.metrics["out_of_scope_recall"] == 1.0
    assert any("abstains as 'none'" in u["message"] for u in updates)
