"""Temperature scaling lowers NLL on an over-confident model; ECE and Brier match hand computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import brier_score_loss, log_loss

from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import (
    TemperatureScaler,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
    reliability,
)


def _overconfident(n: int, seed: int, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so T = 1 is calibrated for z), logits reported as scale * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    y = np.array([rng.choice(3, p=row) for row in softmax(z, axis=1)])
    return scale * z, y


def test_temperature_scaling_lowers_nll_of_an_overconfident_model():
    logits, y = _overconfident(2000, seed=0)
    scaler = TemperatureScaler().fit(logits, y)
    assert scaler.temperature_ == pytest.approx(4.0, rel=0.15)  # undoes the factor 4
    assert scaler.nll_after_ < scaler.nll_before_ - 0.3
    # Held-out data of the same model gains as well, and the decisions do not change.
    test_logits, test_y = _overconfident(2000, seed=1)
    calibrated = scaler.transform(test_logits)
    assert log_loss(test_y, calibrated) < log_loss(test_y, softmax(test_logits, axis=1)) - 0.3
    assert (calibrated.argmax(axis=1) == test_logits.argmax(axis=1)).all()
    assert expected_calibration_error(test_y, calibrated) < expected_calibration_error(
        test_y, softmax(test_logits, axis=1))


def test_fitted_temperature_is_the_nll_minimum():
    logits, y = _overconfident(500, seed=2, scale=0.5)  # under-confident: T below 1
    scaler = TemperatureScaler().fit(logits, y)
    assert scaler.temperature_ < 1
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 2001))
    best = grid[np.argmin([negative_log_likelihood(logits, y, t) for t in grid])]
    assert scaler.temperature_ == pytest.approx(best, rel=0.01)
    assert scaler.nll_after_ == pytest.approx(log_loss(y, scaler.transform(logits)))


def test_log_probabilities_calibrate_like_logits():
    logits, y = _overconfident(300, seed=3)
    from_logits = TemperatureScaler().fit(logits, y).temperature_
    log_probs = np.log(softmax(logits, axis=1))
    assert TemperatureScaler().fit(log_probs, y).temperature_ == pytest.approx(from_logits, rel=1e-3)


def test_scaler_errors():
    with pytest.raises(BreastvisionError, match="before fit"):
        TemperatureScaler().transform(np.zeros((2, 2)))
    with pytest.raises(BreastvisionError, match="NaN or infinite"):
        TemperatureScaler().fit(np.array([[-np.inf, 0.0]]), [1])  # log of a zero probability
    with pytest.raises(BreastvisionError, match="labels of shape"):
        TemperatureScaler().fit(np.zeros((3, 2)), [0, 1])


def test_ece_by_hand():
    # Five bins. Top probabilities 0.9, 0.85 (bin (0.8, 1]), 0.7 (bin (0.6, 0.8]), 0.55 and 0.5
    # (bin (0.4, 0.6]). Correct: first, third and fourth.
    probs = np.array([[0.9, 0.1], [0.15, 0.85], [0.7, 0.3], [0.45, 0.55], [0.5, 0.5]])
    y = np.array([0, 0, 0, 1, 1])  # the last is a tie broken to class 0 by arg-max: wrong
    # Bin (0.8, 1]: accuracy 1/2, confidence 0.875 -> gap 0.375 over 2 images.
    # Bin (0.6, 0.8]: accuracy 1, confidence 0.7 -> 0.3 over 1. Bin (0.4, 0.6]: 1/2 vs 0.525 -> 0.025 over 2.
    expected = (2 * 0.375 + 1 * 0.3 + 2 * 0.025) / 5
    assert expected_calibration_error(y, probs, n_bins=5) == pytest.approx(expected)
    bins = reliability(y, probs, n_bins=5)
    assert bins["count"] == [0, 0, 2, 1, 2]
    assert bins["accuracy"][:2] == [None, None] and bins["accuracy"][4] == pytest.approx(0.5)
    assert bins["confidence"][4] == pytest.approx(0.875)


def test_confidence_on_a_bin_edge_belongs_to_the_lower_bin():
    probs = np.array([[0.6, 0.4], [0.8, 0.2], [0.2, 0.8], [1.0, 0.0], [0.5, 0.5]])
    assert reliability([0, 0, 1, 0, 0], probs, n_bins=5)["count"] == [0, 0, 2, 2, 1]


def test_ece_of_a_perfectly_calibrated_bin_is_zero():
    # Confidence 0.75 in every row, three of four right.
    probs = np.tile([0.75, 0.25], (4, 1))
    assert expected_calibration_error([0, 0, 0, 1], probs) == pytest.approx(0.0)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_brier_equals_sklearn(n_classes):
    rng = np.random.default_rng(4)
    probs = softmax(rng.normal(size=(50, n_classes)), axis=1)
    y = rng.integers(0, n_classes, 50)
    assert brier_score(y, probs) == pytest.approx(
        brier_score_loss(y, probs, labels=list(range(n_classes))))
    # A class absent from the labels still counts through its probabilities.
    only_first = np.zeros(50, dtype=int)
    assert brier_score(only_first, probs) == pytest.approx(
        brier_score_loss(only_first, probs, labels=list(range(n_classes))))


def test_scaler_round_trips_through_a_dict():
    logits, y = _overconfident(200, seed=5)
    scaler = TemperatureScaler().fit(logits, y)
    stored = json.loads(json.dumps(scaler.to_dict()))  # as a model file's JSON header holds it
    again = TemperatureScaler.from_dict(stored)
    np.testing.assert_allclose(again.transform(logits), scaler.transform(logits))
    with pytest.raises(BreastvisionError, match="no usable temperature"):
        TemperatureScaler.from_dict({"temperature": -1})
    with pytest.raises(BreastvisionError, match="before fit"):
        TemperatureScaler().to_dict()
