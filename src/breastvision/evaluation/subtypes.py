"""Recall per subtype: the share of each finer diagnosis's images given their true class.

The subtypes are ``Record.subtype`` (BreakHis's four benign and four malignant tumour types, a
manifest's ``subtype`` column). For a benign subtype the value is the specificity among its images,
for a malignant one the sensitivity: a subtype the model misses hides inside its class's pooled
recall when the class has commoner, easier subtypes. The intervals are drawn from the same
bootstrap resamples as every other metric (patients or groups, ``bootstrap.bootstrap`` with the
same seed), so a subtype seen in few patients gets the wide interval it deserves, and one seen in a
single patient gets none. Images without a subtype are left out of this breakdown only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from breastvision.errors import BreastvisionError
from breastvision.evaluation.bootstrap import Statistic, safe_ratio
from breastvision.evaluation.metrics import check_inputs


def known_subtypes(subtypes: Sequence[str | None]) -> list[str | None] | None:
    """The subtypes as a list, or ``None`` when no image has one: the one "data names no subtypes"
    value that reports, ``Predictions`` and their tables share."""
    return list(subtypes) if any(subtypes) else None


def _members(subtypes: Sequence[str | None]) -> dict[str, np.ndarray]:
    """Subtype -> 0/1 membership of each image, in sorted subtype order."""
    labels = np.array(["" if s is None else str(s) for s in subtypes])
    return {name: (labels == name).astype(np.float64) for name in sorted(set(labels.tolist()) - {""})}


def _check(y: np.ndarray, subtypes: Sequence[str | None]) -> None:
    if len(subtypes) != y.size:
        raise BreastvisionError(f"subtypes must be one per image ({y.size}), got {len(subtypes)}")


def subtype_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    subtypes: Sequence[str | None],
    groups: Sequence[Any] | np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """``{subtype: {"class", "n_images", "n_groups", "correct", "recall"}}``: ``class`` is the true
    class of its images (classes joined by ``/`` if the data gives it several), ``n_groups`` the
    groups (patients) it spans, ``None`` without ``groups``."""
    y, p, g = check_inputs(y_true, probs, class_names, groups)
    _check(y, subtypes)
    correct = p.argmax(axis=1) == y
    names = [str(c) for c in class_names]
    out = {}
    for name, member in _members(subtypes).items():
        inside = member.astype(bool)
        classes = "/".join(names[k] for k in np.unique(y[inside]))
        out[name] = {
            "class": classes,
            "n_images": int(inside.sum()),
            "n_groups": None if g is None else len(set(g[inside].tolist())),
            "correct": int(correct[inside].sum()),
            "recall": float(correct[inside].mean()),
        }
    return out


def subtype_statistic(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str],
    subtypes: Sequence[str | None], groups: Sequence[Any] | np.ndarray | None = None,
) -> Statistic:
    """``per_subtype.<name>.recall`` of :func:`subtype_metrics` as one batched statistic; ``NaN`` in
    a resample that drew none of the subtype's images. With ``groups``, a subtype of one group is
    left out: every resample holds that group whole or not at all, so its interval would be a point."""
    y, p, g = check_inputs(y_true, probs, class_names, groups)
    _check(y, subtypes)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    members = {name: member for name, member in _members(subtypes).items()
               if g is None or len(set(g[member.astype(bool)].tolist())) > 1}

    def statistic(weights: np.ndarray) -> dict[str, np.ndarray]:
        hits = {name: weights @ (member * correct) for name, member in members.items()}
        return {f"per_subtype.{name}.recall": safe_ratio(hits[name], weights @ member, np.nan)
                for name, member in members.items()}

    return statistic
