"""Class imbalance: a class-weighted training loss (``train.class_weighting``) and class-balanced
sampling (``train.sampler``, drawn by ``loop.EpochSampler``).

Both count the **training items** (image views), the inputs the loss actually averages over.
``balanced`` weights follow scikit-learn's ``compute_class_weight("balanced")``: class ``c`` gets
``n / (K · n_c)``, so every class carries the same total weight and a balanced set gets weights 1.
The balanced sampler gives each item the probability ``1 / (K · n_c)`` and draws an epoch of ``n``
items with replacement (``torch.utils.data.WeightedRandomSampler``): every class is expected
``n / K`` times, the minority's images repeated, the majority's partly left out that epoch.

Validation and test are unaffected: the validation loss that selects the best epoch stays the
plain cross-entropy, so runs with and without weighting are selected on the same measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.training.config import TrainConfig


def _check_every_class_present(labels: Sequence[int], class_names: Sequence[str], setting: str) -> None:
    absent = sorted(set(range(len(class_names))) - set(labels))
    if absent:
        names = ", ".join(class_names[i] for i in absent)
        raise BreastvisionError(f"{setting} is balanced but no training image is of class {names}")


def class_weights(labels: Sequence[int], class_names: Sequence[str]) -> np.ndarray:
    """``n / (K · n_c)`` per class ``c`` of the training ``labels`` (indices into ``class_names``)."""
    from sklearn.utils.class_weight import compute_class_weight

    _check_every_class_present(labels, class_names, "train.class_weighting")
    classes = np.arange(len(class_names))
    return compute_class_weight("balanced", classes=classes, y=np.asarray(labels))


def sample_weights(labels: Sequence[int]) -> torch.Tensor:
    """Each item's drawing weight ``1 / n_c`` for the balanced sampler (equal total per class)."""
    index = torch.as_tensor(list(labels), dtype=torch.long)
    counts = torch.bincount(index).double()
    return 1.0 / counts[index]


def classification_loss(
    config: TrainConfig, labels: Sequence[int], class_names: Sequence[str]
) -> tuple[nn.Module, dict[str, Any]]:
    """The training cross-entropy (label smoothing, class weights) and the facts a run records."""
    counts = np.bincount(np.asarray(labels), minlength=len(class_names))
    facts: dict[str, Any] = {
        "class_weighting": config.class_weighting,
        "sampler": config.sampler,
        "training_items_per_class": dict(zip(class_names, counts.tolist(), strict=True)),
    }
    if config.sampler == "balanced":
        _check_every_class_present(labels, class_names, "train.sampler")
    weight = None
    if config.class_weighting == "balanced":
        values = class_weights(labels, class_names)
        facts["class_weights"] = {c: round(float(w), 6) for c, w in zip(class_names, values, strict=True)}
        weight = torch.as_tensor(values, dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing), facts
