"""Thresholds meet their target sensitivity on validation; Youden's J equals a brute-force search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from breastvision.errors import BreastvisionError
from breastvision.evaluation.operating_points import (
    choose_operating_points,
    evaluate_operating_points,
    positive_scores,
    threshold_for_sensitivity,
    youden_threshold,
)
from breastvision.evaluation.report import evaluate_predictions, write_report

BUSI = ["benign", "malignant", "normal"]


def _busi_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three-class probabilities where malignant images score higher on average, with ties."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.55, 0.3, 0.15])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, np.round(probs, 2)


def _sens_spec(is_pos: np.ndarray, scores: np.ndarray, t: float) -> tuple[float, float]:
    called = scores >= t
    return called[is_pos].mean(), (~called[~is_pos]).mean()


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
def test_threshold_meets_target_sensitivity_and_is_the_highest_that_does(target):
    y, probs = _busi_like(400, seed=0)
    chosen = choose_operating_points(y, probs, BUSI, target_sensitivity=target)
    assert chosen["positive_class"] == "malignant"
    threshold = chosen["thresholds"][f"sensitivity>={target:g}"]
    is_pos, scores = y == 1, probs[:, 1]
    sensitivity, specificity = _sens_spec(is_pos, scores, threshold)
    assert sensitivity >= target
    assert chosen["validation"][f"sensitivity>={target:g}"] == pytest.approx(
        {"sensitivity": sensitivity, "specificity": specificity})
    # Any higher candidate threshold (the next distinct score up) misses the target.
    higher = np.unique(scores[scores > threshold])
    assert higher.size == 0 or _sens_spec(is_pos, scores, higher[0])[0] < target


def test_target_reached_exactly_is_accepted():
    # 20 positives at distinct scores: catching 19 is a sensitivity of exactly 0.95.
    scores = np.r_[np.linspace(0.3, 0.99, 20), np.linspace(0.0, 0.5, 30)]
    is_pos = np.r_[np.ones(20, bool), np.zeros(30, bool)]
    assert threshold_for_sensitivity(is_pos, scores, 0.95) == pytest.approx(scores[1])


def test_youden_equals_brute_force():
    y, probs = _busi_like(300, seed=1)
    is_pos, scores = y == 1, probs[:, 1]
    candidates = np.unique(scores)
    j = np.array([sum(_sens_spec(is_pos, scores, t)) - 1 for t in candidates])
    best = candidates[j == j.max()].max()  # the highest threshold among ties
    assert youden_threshold(is_pos, scores) == pytest.approx(best)
    assert choose_operating_points(y, probs, BUSI)["thresholds"]["youden"] == pytest.approx(best)


def test_operating_points_on_test_data_have_intervals():
    y_val, p_val = _busi_like(300, seed=2)
    y_test, p_test = _busi_like(300, seed=3)
    thresholds = choose_operating_points(y_val, p_val, BUSI)["thresholds"]
    result = evaluate_operating_points(y_test, p_test, BUSI, thresholds, n_resamples=300, seed=0)
    for name, threshold in thresholds.items():
        point = result["points"][name]
        sensitivity, specificity = _sens_spec(y_test == 1, p_test[:, 1], threshold)
        assert point["sensitivity"]["value"] == pytest.approx(sensitivity)
        assert point["specificity"]["value"] == pytest.approx(specificity)
        assert point["sensitivity"]["ci_low"] < sensitivity < point["sensitivity"]["ci_high"]
        assert point["sensitivity"]["resampled"] == "images"
    # The 0.95-sensitivity rule trades specificity for sensitivity against Youden's.
    points = result["points"]
    assert points["sensitivity>=0.95"]["specificity"]["value"] < points["youden"]["specificity"]["value"]
    bare = evaluate_operating_points(y_test, p_test, BUSI, thresholds, n_resamples=0)
    assert bare["points"]["youden"]["sensitivity"] == pytest.approx(points["youden"]["sensitivity"]["value"])


def test_report_shows_operating_points_with_group_intervals(tmp_path: Path):
    y_val, p_val = _busi_like(200, seed=4)
    y, probs = _busi_like(200, seed=5)
    groups = [f"g{i // 4}" for i in range(200)]
    thresholds = choose_operating_points(y_val, p_val, BUSI)["thresholds"]
    metrics = evaluate_predictions(y, probs, BUSI, groups, grouping="near_duplicate", thresholds=thresholds,
                                   n_resamples=100)
    points = metrics["operating_points"]["points"]
    assert points["youden"]["sensitivity"]["resampled"] == "near-duplicate groups"
    text = write_report(tmp_path, metrics=metrics).read_text()
    assert "### Operating points (malignant vs the rest)" in text
    assert f"| youden | {thresholds['youden']:.4g} |" in text


def test_positive_class_must_be_known():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(BreastvisionError, match="positive class"):
        positive_scores(probs, ["a", "b", "c"])
    assert positive_scores(probs, ["a", "b", "c"], "c")[0] == 2
    assert positive_scores(probs[:, :2], ["benign", "malignant"])[0] == 1


def test_threshold_needs_both_classes_and_a_sensible_target():
    with pytest.raises(BreastvisionError, match="positive and negative"):
        youden_threshold(np.ones(5, bool), np.linspace(0, 1, 5))
    with pytest.raises(BreastvisionError, match="target sensitivity"):
        threshold_for_sensitivity(np.r_[True, False], np.r_[0.9, 0.1], 0.0)
