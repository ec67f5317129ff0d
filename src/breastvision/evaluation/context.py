"""Patient context: each image's class probabilities blended with the mean over its patient's images.

A pathologist reads the fields of view of one slide together: one field of a fibroadenoma can look
like carcinoma, its neighbours rarely all do. With a weight ``w`` in [0, 1]::

    p'_i = (1 - w) · p_i + w · mean_{j in patient(i)} p_j

``w = 0`` is the image alone; ``w = 1`` gives every image its patient's diagnosis (the mean image
probability, as in the patient diagnosis of ``evaluation.metrics``). Rows stay probability vectors.
The weight is a choice like any other, made on validation folds (:func:`choose_weight`) and then
applied to the test folds. It needs every image's patient when predicting, so it applies to
patient-grouped data only (BreakHis, a manifest's ``patient`` column), never to BUSI's
near-duplicate groups, which are not patients.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from breastvision.errors import BreastvisionError

if TYPE_CHECKING:
    from breastvision.training.run_record import Predictions


def check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise BreastvisionError(f"the patient-context weight must lie in [0, 1], got {weight}")


def with_patient_context(probs: np.ndarray, groups: Sequence[Any], weight: float) -> np.ndarray:
    """``probs`` (images × classes) blended with their group's mean (module docstring)."""
    p = np.asarray(probs, dtype=np.float64)
    check_weight(weight)
    if p.ndim != 2 or len(groups) != len(p):
        raise BreastvisionError(f"patient context needs one group per image row: {len(groups)} groups, "
                                f"probabilities of shape {p.shape}")
    _, index = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    sums = np.zeros((index.max(initial=-1) + 1, p.shape[1]))
    np.add.at(sums, index, p)
    means = sums / np.bincount(index)[:, None]
    return (1.0 - weight) * p + weight * means[index]


def in_context(predictions: Predictions, weight: float) -> Predictions:
    """The same predictions with patient-context probabilities. Operating points and the scope
    belonged to the model file's own probabilities, so they are left out."""
    return dataclasses.replace(
        predictions, probs=with_patient_context(predictions.probs, predictions.groups, weight),
        operating_points=None, scope_scores=None, scope_threshold=None,
    )


def choose_weight(
    validation: Sequence[Predictions], weights: Sequence[float], metric: str = "recall_macro"
) -> tuple[float, dict[float, float]]:
    """The weight whose context maximises ``metric`` (a dotted path into ``compute_metrics``) on the
    folds' validation predictions pooled, each fold put in context on its own; ties go to the
    smaller weight, the one trusting the image more. Returns it and every weight's score."""
    from breastvision.evaluation.metrics import compute_metrics
    from breastvision.evaluation.report import lookup_number

    if not weights or not validation:
        raise BreastvisionError("choosing a patient-context weight needs weights and validation predictions")
    y = np.concatenate([np.asarray(v.y_true) for v in validation])
    # A patient validates several folds: each fold's images are its own patients (and context).
    groups = [f"{fold}/{g}" for fold, v in enumerate(validation) for g in v.groups]
    scores: dict[float, float] = {}
    for weight in sorted(float(w) for w in weights):
        probs = np.concatenate([with_patient_context(v.probs, v.groups, weight) for v in validation])
        metrics = compute_metrics(y, probs, validation[0].class_names, groups)
        scores[weight] = lookup_number(metrics, metric, "patient-context")
    best = max(scores, key=lambda w: (scores[w], -w))
    return best, scores
