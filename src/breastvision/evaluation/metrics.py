"""Image- and patient-level classification metrics, computed with scikit-learn from arrays.

Everything here is a pure function of ``y_true`` (integer labels indexing ``class_names``),
``probs`` (N x C class probabilities, columns in ``class_names`` order) and, for System H,
``groups`` (the patient of each image). The result is one JSON-able dict; its keys name the
average they use (``precision_macro``), so no number is ambiguous in a report.

Choices where the papers are vague, recorded here once:

- Multi-class precision / recall / F1 are macro averages over the model's classes *present in
  the ground truth* (paper 003 does not say; macro is the standard reading and does not let the
  majority class hide a poor minority class). A class absent from ``y_true`` (an external folder
  of benign and malignant images for a three-class model) has no recall, and counting it as 0
  would pull every macro value down; it is named in ``absent_classes`` instead, and predictions
  of it still count as errors of the classes present. Per-class values are reported beside them.
- AUC is one-vs-rest per class. For two classes the AUC is the binary AUC of the positive class
  (one number, the usual one). The macro AUC averages the classes whose AUC is defined; a class
  absent from ``y_true`` (or present in every row) has AUC ``None`` with the reason, and the
  macro value says over how many classes it was taken.
- The predicted class is the arg-max of ``probs``; thresholds for a clinical operating point are
  :mod:`breastvision.evaluation.operating_points`'.
- Calibration: top-label ECE over 15 equal-width confidence bins and the Brier score
  (:mod:`breastvision.evaluation.calibration`); ``reliability`` holds the bins for the diagram.
- Patient level (paper 000, eqs. 1-3): ``P_rp = N_rp / N_np`` per patient, ``P_arp`` the plain
  mean of ``P_rp`` over patients (each patient counts once, whatever its image count) and
  ``P_img = N_r / N_all`` over images, which equals the accuracy.
- Patient diagnosis (``patient.diagnosis``): what a pathologist reports is one diagnosis per
  patient, so each patient's image probabilities are averaged and the arg-max of that mean is the
  patient's diagnosis; accuracy, macro recall and (binary) sensitivity, specificity and AUC are then
  taken over patients. A patient's true class is its images' (they share one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score

from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import brier_score, reliability

#: Names taken as the positive class of a binary task, in order of preference.
POSITIVE_NAMES = ("malignant", "cancer", "tumor", "tumour", "positive", "m")


def check_inputs(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate and convert the inputs shared by every metric; a clear error for each mistake."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    n_classes = len(class_names)
    if n_classes < 2:
        raise BreastvisionError(f"a classifier needs at least two classes, got {list(class_names)}")
    if y.ndim != 1:
        raise BreastvisionError(f"y_true must be one label per image, got shape {y.shape}")
    if y.size == 0:
        raise BreastvisionError("no predictions to evaluate (0 images)")
    if not np.issubdtype(y.dtype, np.integer):
        raise BreastvisionError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if p.shape != (y.size, n_classes):
        raise BreastvisionError(
            f"probs must have shape (n_images, n_classes) = ({y.size}, {n_classes}), got {p.shape}"
        )
    if y.min() < 0 or y.max() >= n_classes:
        raise BreastvisionError(f"labels must lie in 0..{n_classes - 1} (class_names has {n_classes})")
    if not np.isfinite(p).all():
        raise BreastvisionError("probs contain NaN or infinite values")
    g = None
    if groups is not None:
        g = np.asarray(groups).astype(str)
        if g.shape != y.shape:
            raise BreastvisionError(f"groups must be one id per image ({y.size}), got shape {g.shape}")
    return y.astype(np.int64), p, g


def positive_index(class_names: Sequence[str], positive: str | None = None) -> int:
    """Index of the positive class of a binary task: ``positive`` if named, else a conventional name
    ("malignant", ...), else the second class (scikit-learn's convention for labels 0/1)."""
    lowered = [c.lower() for c in class_names]
    if positive is not None:
        if positive.lower() not in lowered:
            raise BreastvisionError(f"positive class {positive!r} is not one of {list(class_names)}")
        return lowered.index(positive.lower())
    for name in POSITIVE_NAMES:
        if name in lowered:
            return lowered.index(name)
    return 1


def one_vs_rest_auc(y: np.ndarray, probs: np.ndarray, k: int) -> tuple[float | None, str | None]:
    """AUC of class ``k`` against the rest, or ``(None, reason)`` when it is undefined."""
    is_k = y == k
    if not is_k.any():
        return None, "class absent from the true labels"
    if is_k.all():
        return None, "every image belongs to this class (no negatives)"
    return float(roc_auc_score(is_k, probs[:, k])), None


def patient_probabilities(
    y: np.ndarray, probs: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per patient (``index``: each image's patient code, 0..P-1): the mean of its images'
    probabilities (P×C) and its true class (the most common of its images' labels)."""
    n_patients = int(index.max()) + 1
    sums = np.zeros((n_patients, probs.shape[1]))
    np.add.at(sums, index, probs)
    mean = sums / np.bincount(index, minlength=n_patients)[:, None]
    votes = np.zeros((n_patients, probs.shape[1]), dtype=np.int64)
    np.add.at(votes, (index, y), 1)
    return mean, votes.argmax(axis=1)


def patient_diagnosis(mean_probs: np.ndarray, truth: np.ndarray, class_names: Sequence[str],
                      pos: int | None) -> dict[str, Any]:
    """Metrics over patients of the diagnosis ``argmax(mean_probs)`` (module docstring)."""
    pred = mean_probs.argmax(axis=1)
    labels = list(range(len(class_names)))
    _, recall, _, support = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n_patients": int(truth.size),
        "accuracy": float((pred == truth).mean()),
        "recall_macro": float(recall[support > 0].mean()),
    }
    if pos is not None:
        out["sensitivity"] = float(recall[pos]) if support[pos] else None
        out["specificity"] = float(recall[1 - pos]) if support[1 - pos] else None
        out["auc"] = one_vs_rest_auc(truth, mean_probs, pos)[0]
    return out


def patient_metrics(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, class_names: Sequence[str],
                    pos: int | None = None) -> dict[str, Any]:
    """Paper 000's eqs. 1-3 (``P_rp`` per patient, their mean ``P_arp``, and ``P_img``) and the
    patient-level diagnosis (``diagnosis``; ``pos``: the positive class of a binary task)."""
    pred = probs.argmax(axis=1)
    correct = (y == pred).astype(np.float64)
    ids, index = np.unique(groups, return_inverse=True)
    n_images = np.bincount(index, minlength=ids.size)
    n_correct = np.bincount(index, weights=correct, minlength=ids.size)
    p_rp = n_correct / n_images
    mean_probs, truth = patient_probabilities(y, probs, index)
    per_patient = {
        str(pid): {
            "n_images": int(n),
            "n_correct": int(c),
            "P_rp": float(r),
            # A patient's images share one diagnosis; several labels would be a data problem.
            "true_labels": sorted({int(v) for v in y[index == i]}),
            "diagnosis": int(mean_probs[i].argmax()),
        }
        for i, (pid, n, c, r) in enumerate(zip(ids, n_images, n_correct, p_rp, strict=True))
    }
    return {
        "n_patients": int(ids.size),
        "P_arp": float(p_rp.mean()),
        "P_img": float(correct.mean()),
        "diagnosis": patient_diagnosis(mean_probs, truth, class_names, pos),
        "per_patient": per_patient,
    }


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    positive_class: str | None = None,
) -> dict[str, Any]:
    """Every metric of both papers for one set of predictions, as a JSON-able dict.

    ``groups`` are patient ids; when given, the ``patient`` entry holds ``P_rp`` / ``P_arp`` /
    ``P_img``. Binary tasks also get ``sensitivity`` and ``specificity`` of ``positive_class``
    (default: "malignant" when present, see :func:`positive_index`).
    """
    y, p, g = check_inputs(y_true, probs, class_names, groups)
    names = [str(c) for c in class_names]
    n_classes = len(names)
    labels = list(range(n_classes))
    pred = p.argmax(axis=1)

    # zero_division=0: a class never predicted scores precision 0 rather than raising a warning.
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    present = support > 0
    aucs = [one_vs_rest_auc(y, p, k) for k in labels]
    per_class = {
        name: _class_entry(k, precision, recall, f1, support, aucs[k]) for k, name in enumerate(names)
    }

    out: dict[str, Any] = {
        "task": "binary" if n_classes == 2 else "multiclass",
        "class_names": names,
        "n_images": int(y.size),
        "accuracy": float((pred == y).mean()),
        "precision_macro": float(precision[present].mean()),
        "recall_macro": float(recall[present].mean()),
        "f1_macro": float(f1[present].mean()),
        "macro_average": f"over the {int(present.sum())} of {n_classes} classes present in the true labels",
        "absent_classes": [n for n, here in zip(names, present, strict=True) if not here],
        "brier": brier_score(y, p),
    }
    out["reliability"] = reliability(y, p)
    out["ece"] = out["reliability"]["ece"]
    pos = positive_index(names, positive_class) if n_classes == 2 else None
    out.update(_summary_auc(aucs, names, pos))
    if pos is not None:
        out["positive_class"] = names[pos]
        out["sensitivity"] = per_class[names[pos]]["recall"]
        out["specificity"] = per_class[names[1 - pos]]["recall"]
    out["per_class"] = per_class
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()
    if g is not None:
        out["patient"] = patient_metrics(y, p, g, names, pos)
    return out


def _class_entry(
    k: int,
    precision: np.ndarray,
    recall: np.ndarray,
    f1: np.ndarray,
    support: np.ndarray,
    auc: tuple[float | None, str | None],
) -> dict[str, Any]:
    """One class's row; recall and F1 are ``None`` for a class absent from the true labels."""
    absent = support[k] == 0
    entry: dict[str, Any] = {
        "precision": float(precision[k]),
        "recall": None if absent else float(recall[k]),
        "f1": None if absent else float(f1[k]),
        "support": int(support[k]),
        "auc": auc[0],
    }
    if auc[1]:
        entry["auc_note"] = auc[1]
    return entry


def _summary_auc(
    aucs: list[tuple[float | None, str | None]], names: list[str], pos: int | None
) -> dict[str, Any]:
    """The headline AUC: the positive class's for binary tasks, else the macro over defined classes."""
    if pos is not None:
        value, reason = aucs[pos]
        out: dict[str, Any] = {"auc": value, "auc_average": f"binary ({names[pos]} vs {names[1 - pos]})"}
        if reason:
            out["auc_note"] = f"undefined: {reason}"
        return out
    defined = [v for v, _ in aucs if v is not None]
    out = {
        "auc": float(np.mean(defined)) if defined else None,
        "auc_average": f"macro one-vs-rest over {len(defined)} of {len(names)} classes",
    }
    missing = [f"{n} ({r})" for n, (v, r) in zip(names, aucs, strict=True) if v is None]
    if missing:
        out["auc_note"] = "AUC undefined for " + "; ".join(missing)
    return out
