from __future__ import annotations

import pytest
import torch

from adaptgate.training.methods.abstain import calibrate, calibrate_head


def test_the_threshold_is_the_lowest_score_reaching_the_precision() -> None:
    in_scope = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4])
    out = torch.tensor([0.65, 0.42, 0.3, 0.2])
    a = calibrate(in_scope, out, "oos", target_precision=0.9)
    # at 0.45: answers 9 in-scope and 1 out (0.65) -> 0.9 precision; at 0.42 it would answer 2 out of 11
    assert a.threshold == pytest.approx(0.45) and a.label == "oos"
    assert a.in_scope_coverage == 0.9 and a.out_of_scope_recall == 0.75 and a.in_scope_precision == 0.9


def test_separable_scores_abstain_on_every_out_of_scope_row_and_answer_every_in_scope_one() -> None:
    a = calibrate(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0.3, 0.4]), "none")
    assert (a.threshold, a.out_of_scope_recall, a.in_scope_coverage) == (pytest.approx(0.7), 1.0, 1.0)


def test_when_no_threshold_reaches_the_precision_it_abstains_above_every_score() -> None:
    a = calibrate(torch.tensor([0.5]), torch.tensor([0.9, 0.8]), "oos")
    assert a.threshold > 0.9 and a.out_of_scope_recall == 1.0 and a.in_scope_coverage == 0.0


def test_tied_scores_are_admitted_together() -> None:
    a = calibrate(torch.tensor([0.8, 0.6]), torch.tensor([0.6, 0.6]), "oos", target_precision=0.6)
    assert a.threshold == pytest.approx(0.8)  # 0.6 admits both out-of-scope rows with it: 2/4 < 0.6


def test_answers_of_the_out_of_scope_class_abstain_at_any_threshold() -> None:
    # label ids: 0 "a", 1 "b", 2 "none"; rows 0-3 in scope, 4-5 out of scope
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7],
                          [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    truth = torch.tensor([0, 1, 0, 1, 2, 2])
    a = calibrate_head(probs, truth, 2, "none", target_precision=0.99)
    # row 5 (out of scope, answered "a" at 0.7) must be under the threshold; row 4 abstains by class
    assert a.threshold == pytest.approx(0.8) and a.out_of_scope_recall == 1.0
    assert a.in_scope_coverage == 0.5 and a.in_scope_accuracy == 0.5  # rows 0 and 1 answered, both right
