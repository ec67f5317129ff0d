"""Percentile bootstrap confidence intervals, resampling images or whole groups (patients, near-duplicates).

A resample is represented by *weights*: how many times each image was drawn. Every metric here
is a weighted sum over images, so a resample never copies data and a batch of resamples is one
``(B, N)`` array; the metrics below evaluate a whole batch with a few matrix products instead of
one scikit-learn call per resample.

With ``groups`` (patient ids, or BUSI's near-duplicate groups) the bootstrap draws *groups* with
replacement and each drawn group brings all of its images (a cluster bootstrap): images of one
patient, or copies of one scan, are correlated, so resampling them one by one would give intervals
that are too narrow. A group drawn twice counts as two groups, which is the standard
cluster-bootstrap reading. :func:`resampling_unit` names what was drawn, for the reports.

Any other metric can be bootstrapped with :func:`bootstrap` through :func:`with_sample_weight`,
which wraps a scikit-learn style ``metric(..., sample_weight=w)`` (a Python loop, slower).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from breastvision.data.records import PATIENT_GROUPINGS
from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import brier_per_image, confidence_bins
from breastvision.evaluation.metrics import check_inputs, patient_probabilities, positive_index

#: A batched statistic: resample weights ``(B, N)`` -> one value per resample ``(B,)``, or several
#: named values. ``NaN`` marks a resample where the statistic is undefined.
Statistic = Callable[[np.ndarray], "np.ndarray | dict[str, np.ndarray]"]

#: Upper bound on the entries of one batch of weights (memory stays around 32 MB of float64).
_MAX_BATCH_ENTRIES = 4_000_000


def resample_weights(
    n: int,
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Iterator[np.ndarray]:
    """Batches of bootstrap weights, ``(b, n)`` each, ``n_resamples`` rows in all.

    Without ``groups``: ``n`` images drawn with replacement. With ``groups``: as many groups as
    there are, drawn with replacement, each bringing all of its images.
    """
    if n_resamples < 1:
        raise BreastvisionError(f"n_resamples must be at least 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    if groups is None:
        codes, n_units = np.arange(n), n
    else:
        _, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        n_units = int(codes.max()) + 1
    batch = max(1, min(n_resamples, _MAX_BATCH_ENTRIES // max(n, n_units)))
    done = 0
    while done < n_resamples:
        b = min(batch, n_resamples - done)
        draws = rng.integers(0, n_units, size=(b, n_units))
        # Row-offset bincount: the draw counts of every resample in one call.
        counts = np.bincount((draws + n_units * np.arange(b)[:, None]).ravel(), minlength=b * n_units)
        counts = counts.reshape(b, n_units).astype(np.float64)
        yield counts if groups is None else counts[:, codes]
        done += b


def resampling_unit(grouping: str | None, patients: bool | None = None) -> str:
    """What a bootstrap over the groups of a ``Catalog.grouping`` draws, as a report says it.

    ``patients`` (default: whether the grouping is a patient grouping) says whether the groups are
    taken as patients; otherwise ``None`` or ``"image"`` groups are single images.
    """
    if patients is None:
        patients = grouping in PATIENT_GROUPINGS
    if patients:
        return "patients"
    if grouping is None or grouping == "image":
        return "images"
    named = {"near_duplicate": "near-duplicate groups", "group": "groups"}
    return named.get(grouping, f"groups ({grouping})")


def bootstrap(
    statistic: Statistic,
    n: int,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    unit: str = "groups",
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Point value and percentile interval of a batched ``statistic`` over ``n`` images.

    ``unit`` names what a group is (``resampled``; see :func:`resampling_unit`); without ``groups``
    images are resampled. Returns ``{"value", "ci_low", "ci_high", "n_resamples", "resampled",
    "confidence"}``, or a dict
    of those keyed by name when the statistic returns several values. Resamples where a statistic
    is undefined (e.g. AUC when a resample holds one class only) are left out of its interval and
    counted in ``n_undefined``.
    """
    if not 0 < confidence < 1:
        raise BreastvisionError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    point = statistic(np.ones((1, n)))
    chunks = [statistic(w) for w in resample_weights(n, groups, n_resamples=n_resamples, seed=seed)]
    unit = unit if groups is not None else "images"
    if isinstance(point, dict):
        return {
            key: _interval(point[key][0], np.concatenate([c[key] for c in chunks]), unit, confidence)
            for key in point
        }
    return _interval(point[0], np.concatenate(chunks), unit, confidence)


def _interval(value: float, samples: np.ndarray, unit: str, confidence: float) -> dict[str, Any]:
    finite = samples[np.isfinite(samples)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail]) if finite.size else (None, None)
    out: dict[str, Any] = {
        "value": None if not np.isfinite(value) else float(value),
        "ci_low": None if low is None else float(low),
        "ci_high": None if high is None else float(high),
        "n_resamples": int(samples.size),
        "resampled": unit,
        "confidence": confidence,
    }
    if finite.size < samples.size:
        out["n_undefined"] = int(samples.size - finite.size)
    return out


def with_sample_weight(metric: Callable[..., float], *arrays: Any) -> Statistic:
    """Any scikit-learn style ``metric(*arrays, sample_weight=w)`` as a batched statistic.

    Zero weights leave an image out, so a resample is exact; a metric that raises on a resample
    (e.g. a single class) gives ``NaN`` there.
    """

    def statistic(weights: np.ndarray) -> np.ndarray:
        values = np.empty(weights.shape[0])
        for i, w in enumerate(weights):
            try:
                values[i] = metric(*arrays, sample_weight=w)
            except ValueError:
                values[i] = np.nan
        return values

    return statistic


def safe_ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    """``num / den`` with ``empty`` where ``den`` is 0 (scikit-learn's ``zero_division``)."""
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, empty)


def _present_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Row means of ``values`` ``(B, C)`` over the classes ``present`` in each resample."""
    return np.where(present, np.nan_to_num(values), 0.0).sum(axis=1) / present.sum(axis=1)


def weighted_auc(target: np.ndarray, score: np.ndarray) -> Statistic:
    """Batched ROC AUC of ``score`` for the boolean ``target``, with ties counted one half.

    The weighted Mann-Whitney statistic, equal to scikit-learn's ``roc_auc_score`` with
    ``sample_weight``. Resampling changes weights, never scores, so the ordering is computed once.
    """
    order = np.argsort(score, kind="stable")
    sorted_scores = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos = target[order].astype(np.float64)

    def statistic(weights: np.ndarray) -> np.ndarray:
        w = weights[:, order]
        # Weight of positives and negatives at each distinct score, ascending.
        p = np.add.reduceat(w * pos, starts, axis=1)
        q = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
        below = np.cumsum(q, axis=1) - q
        area = (p * (below + 0.5 * q)).sum(axis=1)
        return safe_ratio(area, p.sum(axis=1) * q.sum(axis=1), np.nan)

    return statistic


def classification_statistic(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    positive_class: str | None = None,
) -> Statistic:
    """The scalar metrics of :func:`metrics.compute_metrics` as one batched statistic.

    Keys are flat, dotted paths into the metrics dict (``accuracy``, ``per_class.benign.recall``,
    ``patient.P_arp``); with all weights 1 every value equals the scikit-learn one reported by
    ``compute_metrics``. ``patient.P_arp`` assumes whole-patient weights (the cluster bootstrap):
    it is the mean of ``P_rp`` over drawn patients, each counted as often as it was drawn.
    """
    y, p, g = check_inputs(y_true, probs, class_names, groups)
    names = [str(c) for c in class_names]
    pos = positive_index(names, positive_class) if len(names) == 2 else None
    image = _image_statistic(y, p, names, pos)
    patient = None if g is None else _patient_statistic(y, p, g, pos)

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        out = image(weights)
        if patient is not None:
            out.update(patient(weights, out["accuracy"]))
        return out

    return statistic


def _image_statistic(y: np.ndarray, p: np.ndarray, names: list[str], pos: int | None) -> Statistic:
    """The image-level keys of :func:`classification_statistic`; the arrays are prepared once,
    and the returned closure is called once per batch of resamples."""
    n_classes = len(names)
    pred = p.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    truth = np.eye(n_classes)[y]  # (N, C) one-hot of the true class
    guess = np.eye(n_classes)[pred]
    brier = brier_per_image(y, p)
    # Signed gap (correct - confidence) of each image, placed in its confidence bin's column.
    bins = confidence_bins(p)
    gap = np.zeros((y.size, int(bins.max()) + 1))
    gap[np.arange(y.size), bins] = correct - p.max(axis=1)
    aucs = {k: weighted_auc(y == k, p[:, k]) for k in range(n_classes) if 0 < (y == k).sum() < y.size}
    held = sorted(set(np.unique(y).tolist()))  # no interval for a class the data does not hold

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        total = weights.sum(axis=1)
        tp, support, predicted = weights @ (truth * guess), weights @ truth, weights @ guess
        # As in compute_metrics: macro over the classes present (in this resample), and no
        # recall or F1 for a class absent from it.
        present = support > 0
        per_class = {
            "precision": safe_ratio(tp, predicted, 0.0),
            "recall": safe_ratio(tp, support, np.nan),
            "f1": np.where(present, safe_ratio(2 * tp, support + predicted, 0.0), np.nan),
            "auc": {k: fn(weights) for k, fn in aucs.items()},
        }
        out = {"accuracy": weights @ correct / total}
        for key in ("precision", "recall", "f1"):
            out[f"{key}_macro"] = _present_mean(per_class[key], present)
        out["brier"] = weights @ brier / total
        out["ece"] = np.abs(weights @ gap).sum(axis=1) / total
        if pos is not None:
            out["auc"] = per_class["auc"].get(pos, np.full(len(weights), np.nan))
            out["sensitivity"] = per_class["recall"][:, pos]
            out["specificity"] = per_class["recall"][:, 1 - pos]
        elif aucs:
            # Classes whose AUC is undefined on the full data are left out, as in compute_metrics.
            out["auc"] = np.mean(list(per_class["auc"].values()), axis=0)
        for k in held:
            out.update(_class_entries(names[k], k, per_class))
        return out

    return statistic


def _class_entries(name: str, k: int, per_class: dict[str, Any]) -> dict[str, np.ndarray]:
    """``per_class.<name>.*`` of class ``k`` from the batched per-class arrays (AUC where defined)."""
    out = {f"per_class.{name}.{key}": per_class[key][:, k] for key in ("precision", "recall", "f1")}
    if k in per_class["auc"]:
        out[f"per_class.{name}.auc"] = per_class["auc"][k]
    return out


def _patient_statistic(
    y: np.ndarray, p: np.ndarray, g: np.ndarray, pos: int | None
) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """``patient.*`` of :func:`classification_statistic` under whole-patient weights; the closure
    also takes the resamples' image accuracy, which ``P_img`` is."""
    _, codes = np.unique(g, return_inverse=True)
    # Weighting an image by 1/size of its patient turns image sums into patient counts.
    per_image = 1.0 / np.bincount(codes).astype(np.float64)[codes]
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    diagnosis = _patient_diagnosis_statistic(y, p, codes, per_image, pos)

    def statistic(weights: np.ndarray, accuracy: np.ndarray) -> dict[str, np.ndarray]:
        out = {"patient.P_arp": (weights @ (correct * per_image)) / (weights @ per_image),
               "patient.P_img": accuracy}
        out.update(diagnosis(weights))
        return out

    return statistic


def _patient_diagnosis_statistic(y: np.ndarray, p: np.ndarray, codes: np.ndarray, per_image: np.ndarray,
                                 pos: int | None) -> Statistic:
    """``patient.diagnosis.*`` of :func:`metrics.patient_diagnosis` under whole-patient weights:
    each image carries its patient's diagnosis and true class, weighted 1/size of its patient, so
    image sums are patient counts."""
    mean_probs, truth = patient_probabilities(y, p, codes)
    right = (mean_probs.argmax(axis=1) == truth)[codes] * per_image
    truth_of_image = np.eye(p.shape[1])[truth[codes]]  # (N, C) one-hot of the patient's class
    auc = None
    if pos is not None and 0 < (truth == pos).sum() < truth.size:
        auc = weighted_auc(truth[codes] == pos, mean_probs[codes, pos])

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        support = weights @ (truth_of_image * per_image[:, None])
        hits = weights @ (truth_of_image * right[:, None])
        recall = safe_ratio(hits, support, np.nan)
        out = {"patient.diagnosis.accuracy": (weights @ right) / (weights @ per_image),
               "patient.diagnosis.recall_macro": _present_mean(recall, support > 0)}
        if pos is not None:
            out["patient.diagnosis.sensitivity"] = recall[:, pos]
            out["patient.diagnosis.specificity"] = recall[:, 1 - pos]
            if auc is not None:
                out["patient.diagnosis.auc"] = auc(weights * per_image)
        return out

    return statistic
