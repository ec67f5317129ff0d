"""Operating points of the clinical binary reading: malignant against the rest.

Whatever the model's classes (benign / malignant, or BUSI's benign / malignant / normal), the
clinical question is "is it malignant?". The score is the positive class's probability and an
image is called positive when ``score >= threshold``, scikit-learn's ``roc_curve`` convention.
Thresholds are chosen on *validation* predictions (:func:`choose_operating_points`) and then
applied unchanged to test data (:func:`operating_point_statistic` with :func:`bootstrap`), so the
test numbers show what the chosen rule really does:

- ``sensitivity >= target`` (default 0.95): the highest threshold whose validation sensitivity
  reaches the target, i.e. the most specific rule that misses at most 5% of cancers there;
- ``youden``: the threshold maximising Youden's J = sensitivity + specificity - 1 (the highest
  one among ties).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from breastvision.errors import BreastvisionError
from breastvision.evaluation.bootstrap import Statistic, bootstrap, safe_ratio
from breastvision.evaluation.metrics import POSITIVE_NAMES, check_inputs, positive_index

#: Default sensitivity an operating point must reach on validation.
TARGET_SENSITIVITY = 0.95


def has_positive_class(class_names: Sequence[str]) -> bool:
    """Whether the malignant-vs-rest reading is defined without being told the positive class: a
    binary task, or a class with a conventional positive name ("malignant", ...)."""
    return len(class_names) == 2 or bool(set(POSITIVE_NAMES) & {str(c).lower() for c in class_names})


def positive_scores(
    probs: np.ndarray, class_names: Sequence[str], positive_class: str | None = None
) -> tuple[int, np.ndarray]:
    """Index of the positive (malignant) class and its probability per image, the reading's score.

    A model of more than two classes must have a conventionally named positive class ("malignant",
    ...) or be told it: there, "the second class" would be an arbitrary choice.
    """
    if positive_class is None and not has_positive_class(class_names):
        raise BreastvisionError(f"which of {list(class_names)} is the positive class? name it (--positive)")
    pos = positive_index(class_names, positive_class)
    return pos, np.asarray(probs, dtype=np.float64)[:, pos]


def _roc(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if is_positive.all() or not is_positive.any():
        raise BreastvisionError("choosing a threshold needs positive and negative validation images")
    # Every distinct score as a threshold: dropping "intermediate" points could drop the one sought.
    fpr, tpr, thresholds = roc_curve(is_positive, scores, drop_intermediate=False)
    return fpr[1:], tpr[1:], thresholds[1:]  # the first row is the +inf threshold (nothing called)


def threshold_for_sensitivity(
    is_positive: np.ndarray, scores: np.ndarray, target: float = TARGET_SENSITIVITY
) -> float:
    """The highest threshold whose sensitivity on these data is at least ``target``."""
    if not 0 < target <= 1:
        raise BreastvisionError(f"target sensitivity must lie in (0, 1], got {target}")
    _, tpr, thresholds = _roc(np.asarray(is_positive, dtype=bool), np.asarray(scores, dtype=np.float64))
    # tpr rises as the threshold falls; a tolerance keeps 19/20 = 0.95 from reading as 0.9499999.
    return float(thresholds[np.argmax(tpr >= target - 1e-12)])


def youden_threshold(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the highest among ties)."""
    fpr, tpr, thresholds = _roc(np.asarray(is_positive, dtype=bool), np.asarray(scores, dtype=np.float64))
    return float(thresholds[np.argmax(tpr - fpr)])


def sensitivity_specificity(is_positive: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity of calling ``score >= threshold`` positive (``None``: undefined)."""
    values = operating_point_statistic(is_positive, scores, threshold)(np.ones((1, len(scores))))
    return {k: float(v[0]) if np.isfinite(v[0]) else None for k, v in values.items()}


def choose_operating_points(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    target_sensitivity: float = TARGET_SENSITIVITY,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """Thresholds chosen on validation predictions, JSON-able for the model file.

    ``{"positive_class", "rule", "target_sensitivity", "thresholds": {name: t}, "validation":
    {name: {"sensitivity", "specificity"}}, "n_validation"}``; names are ``sensitivity>=0.95``
    and ``youden``.
    """
    y, p, _ = check_inputs(y_true, probs, class_names)
    pos, scores = positive_scores(p, class_names, positive_class)
    is_positive = y == pos
    thresholds = {
        f"sensitivity>={target_sensitivity:g}": threshold_for_sensitivity(
            is_positive, scores, target_sensitivity),
        "youden": youden_threshold(is_positive, scores),
    }
    name = str(class_names[pos])
    return {
        "positive_class": name,
        "rule": f"{name} when P({name}) >= threshold, else the rest",
        "target_sensitivity": target_sensitivity,
        "thresholds": thresholds,
        "validation": {k: sensitivity_specificity(is_positive, scores, t) for k, t in thresholds.items()},
        "n_validation": int(y.size),
    }


def operating_point_statistic(is_positive: np.ndarray, scores: np.ndarray, threshold: float) -> Statistic:
    """Batched sensitivity and specificity at ``threshold``, for :func:`bootstrap.bootstrap`."""
    truth = np.asarray(is_positive, dtype=np.float64)
    called = (np.asarray(scores) >= threshold).astype(np.float64)

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "sensitivity": safe_ratio(weights @ (truth * called), weights @ truth, np.nan),
            "specificity": safe_ratio(weights @ ((1 - truth) * (1 - called)), weights @ (1 - truth), np.nan),
        }

    return statistic


def evaluate_operating_points(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    thresholds: Mapping[str, float],
    *,
    positive_class: str | None = None,
    groups: Sequence[Any] | np.ndarray | None = None,
    unit: str = "groups",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Sensitivity and specificity of each named threshold on these (test) data, with bootstrap
    intervals resampling ``groups`` whole when given (as :func:`report.evaluate_predictions`)."""
    y, p, _ = check_inputs(y_true, probs, class_names)
    pos, scores = positive_scores(p, class_names, positive_class)
    is_positive = y == pos
    points = {}
    for name, threshold in thresholds.items():
        if n_resamples > 0:
            statistic = operating_point_statistic(is_positive, scores, float(threshold))
            point = bootstrap(statistic, y.size, groups=groups, unit=unit, n_resamples=n_resamples,
                              seed=seed, confidence=confidence)
        else:
            point = sensitivity_specificity(is_positive, scores, float(threshold))
        points[name] = {"threshold": float(threshold), **point}
    return {"positive_class": str(class_names[pos]), "points": points}
