"""Probability calibration: temperature scaling, expected calibration error, Brier score.

Temperature scaling (Guo et al., 2017, "On calibration of modern neural networks") divides the
logits by one scalar ``T`` fitted on held-out (validation) data by minimising the negative log
likelihood; it leaves the arg-max, hence accuracy, unchanged and only makes the probabilities
mean what they say. Log-probabilities are valid logits here (softmax ignores a per-row shift), so
a run that kept only probabilities can be calibrated from ``np.log(probs)``. Under test-time
augmentation the logits are a V×N×K stack, one N×K per view, and the probability is what the
predictors give: the mean over the views of ``softmax(logits / T)`` (:func:`calibrated_probabilities`),
so the temperature is fitted for that mean, not for any one view.

The expected calibration error is the top-label one of the same paper: images are put into
``n_bins`` equal-width bins of their highest probability (the confidence), and ECE is the
image-weighted mean gap between each bin's accuracy and its mean confidence. Bins are
right-closed, ``(lo, hi]``, the first one also holding 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp, softmax

from breastvision.errors import BreastvisionError

#: Bins of the ECE and the reliability diagram (the number Guo et al. use).
N_BINS = 15

#: Temperatures searched; far outside them a model is broken rather than mis-calibrated.
TEMPERATURE_RANGE = (0.05, 20.0)
_LOG_T_BOUNDS = (np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1]))


def _check_logits(logits: np.ndarray, y: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim not in (2, 3) or z.shape[-1] < 2 or (z.ndim == 3 and z.shape[0] < 1):
        raise BreastvisionError(f"logits must be ([n_views,] n_images, n_classes >= 2), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise BreastvisionError("logits contain NaN or infinite values (log of a zero probability?)")
    if y is not None and np.asarray(y).shape != (z.shape[-2],):
        raise BreastvisionError(f"{z.shape[-2]} rows of logits but labels of shape {np.asarray(y).shape}")
    return z


def _log_probabilities(z: np.ndarray, temperature: float) -> np.ndarray:
    """N×K log of :func:`calibrated_probabilities`, computed stably."""
    log_p = log_softmax(z / temperature, axis=-1)
    return log_p if z.ndim == 2 else logsumexp(log_p, axis=0) - np.log(z.shape[0])


def calibrated_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` of N×K logits; of a V×N×K view stack, its mean over the
    views (module docstring)."""
    z = _check_logits(logits)
    probs = softmax(z / temperature, axis=-1)
    return probs if z.ndim == 2 else probs.mean(axis=0)


def negative_log_likelihood(
    logits: np.ndarray, y: Sequence[int] | np.ndarray, temperature: float = 1.0
) -> float:
    """Mean NLL of the true classes under :func:`calibrated_probabilities`."""
    z = _check_logits(logits, y)
    labels = np.asarray(y, dtype=np.int64)
    return float(-_log_probabilities(z, temperature)[np.arange(labels.size), labels].mean())


class TemperatureScaler:
    """One temperature for all logits, scikit-learn style: ``fit(logits, y)`` then ``transform``;
    logits are N×K, or a V×N×K stack of views (module docstring).

    ``temperature_`` > 1 softens an over-confident model, < 1 sharpens an under-confident one.
    ``nll_before_`` / ``nll_after_`` are the fitting data's NLL at ``T = 1`` and at the fit.
    """

    temperature_: float
    nll_before_: float | None
    nll_after_: float | None

    def fit(self, logits: np.ndarray, y: Sequence[int] | np.ndarray) -> TemperatureScaler:
        z = _check_logits(logits, y)
        labels = np.asarray(y, dtype=np.int64)
        if labels.size == 0:
            raise BreastvisionError("temperature scaling needs at least one validation image")
        # One view's NLL is convex in 1/T, so it has one minimum along log T: a bounded Brent search
        # finds it (and the minimum within the range for a view stack's mean, convex or not).
        result = minimize_scalar(lambda log_t: negative_log_likelihood(z, labels, float(np.exp(log_t))),
                                 bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
        self.temperature_ = float(np.exp(result.x))
        self.nll_before_ = negative_log_likelihood(z, labels)
        self.nll_after_ = negative_log_likelihood(z, labels, self.temperature_)
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (:func:`calibrated_probabilities` at ``temperature_``)."""
        if not hasattr(self, "temperature_"):
            raise BreastvisionError("TemperatureScaler.transform called before fit")
        return calibrated_probabilities(logits, self.temperature_)

    def fit_transform(self, logits: np.ndarray, y: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.fit(logits, y).transform(logits)

    def to_dict(self) -> dict[str, Any]:
        """What a model file stores: the temperature and the fitting data's NLL before and after."""
        if not hasattr(self, "temperature_"):
            raise BreastvisionError("TemperatureScaler.to_dict called before fit")
        return {"method": "temperature scaling", "temperature": self.temperature_,
                "nll_before": self.nll_before_, "nll_after": self.nll_after_}

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> TemperatureScaler:
        """The scaler :meth:`to_dict` described, ready to ``transform``."""
        temperature = stored.get("temperature")
        if not isinstance(temperature, int | float) or not 0 < temperature < np.inf:
            raise BreastvisionError(f"stored calibration has no usable temperature: {stored!r}")
        scaler = cls()
        scaler.temperature_ = float(temperature)
        scaler.nll_before_, scaler.nll_after_ = stored.get("nll_before"), stored.get("nll_after")
        return scaler


def confidence_bins(probs: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """The ECE bin (0 .. n_bins - 1) of each image's top probability."""
    if n_bins < 1:
        raise BreastvisionError(f"n_bins must be at least 1, got {n_bins}")
    confidence = np.asarray(probs, dtype=np.float64).max(axis=1)
    # Against the same edges the report lists, so an edge value lands where the table says.
    return np.clip(np.searchsorted(bin_edges(n_bins), confidence, side="left") - 1, 0, n_bins - 1)


def bin_edges(n_bins: int = N_BINS) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def reliability(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = N_BINS
) -> dict[str, Any]:
    """Per bin: image count, mean confidence and accuracy (``None`` for an empty bin), and the ECE."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    bins = confidence_bins(p, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    confidence = np.bincount(bins, weights=p.max(axis=1), minlength=n_bins)
    correct = np.bincount(bins, weights=(p.argmax(axis=1) == y).astype(np.float64), minlength=n_bins)
    filled = counts > 0
    gaps = np.abs(correct - confidence)  # per bin: count * |accuracy - mean confidence|
    return {
        "edges": bin_edges(n_bins).tolist(),
        "count": counts.tolist(),
        "confidence": [float(c / n) if n else None for c, n in zip(confidence, counts, strict=True)],
        "accuracy": [float(c / n) if n else None for c, n in zip(correct, counts, strict=True)],
        "ece": float(gaps[filled].sum() / y.size),
    }


def expected_calibration_error(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = N_BINS
) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (module docstring)."""
    return reliability(y_true, probs, n_bins)["ece"]


def brier_per_image(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each image's term of :func:`brier_score` (their mean is the score), for batched resamples."""
    p = np.asarray(probs, dtype=np.float64)
    squared = ((p - np.eye(p.shape[1])[np.asarray(y_true)]) ** 2).sum(axis=1)
    return squared / 2 if p.shape[1] == 2 else squared


def brier_score(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """Brier score, equal to scikit-learn's ``brier_score_loss(y, probs, labels=all classes)``: for
    two classes the mean squared error of one class's probability (either: they are equal), for
    more the mean over images of the squared distance to the one-hot truth.

    Computed here because scikit-learn warns whenever a row's sum is off 1 by more than 1.5e-8,
    which float32 softmax outputs and the 6-decimal predictions files routinely are.
    """
    return float(brier_per_image(y_true, probs).mean())
