"""After training: the model's scope (``models.scope``) fitted on the pooled features of the training
images and thresholded on the validation images, stored in the model file.

Images go through the prediction path (``data.io.load_image`` then ``data.transforms.preprocess_image``,
identity view, with the fitted stain normaliser), not the training views, so the features fitted on
are the ones ``predict`` computes. At most ``MAX_FIT_IMAGES`` training images (a seeded sample) are
used: a shared covariance is well estimated long before BreakHis's thousands, and each image costs a
full forward pass (the training epochs may have run on cached features).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from breastvision.data.io import load_image
from breastvision.data.transforms import preprocess_image
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing
from breastvision.models.scope import Scope, pooled_features
from breastvision.serving.predict import batched
from breastvision.training.views import Item

log = logging.getLogger(__name__)

MAX_FIT_IMAGES = 1000
_BATCH = 32


def image_features(model: torch.nn.Module, records: Sequence[tuple[str, int]], preprocessing: Preprocessing,
                   device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N×D) and labels of ``(path, label)`` records; unreadable files are left out."""
    features, labels = [], []
    for batch in batched(records, _BATCH):
        tensors, kept = [], []
        for path, label in batch:
            try:
                tensors.append(preprocess_image(load_image(path), preprocessing))
                kept.append(label)
            except BreastvisionError as err:
                log.warning(f"scope: leaving out {path}: {err}")
        if tensors:
            features.append(pooled_features(model, torch.stack(tensors).to(device))[1].cpu().numpy())
            labels.extend(kept)
    if not features:
        raise BreastvisionError("scope: no readable images")
    return np.concatenate(features), np.asarray(labels)


def _identity(items: Sequence[Item]) -> list[tuple[str, int]]:
    """One ``(path, label)`` per record, whatever views training drew of it."""
    return list(dict.fromkeys((str(i.record.path), i.record.label) for i in items))


def fit_scope(model: torch.nn.Module, train: Sequence[Item], val: Sequence[Item],
              preprocessing: Preprocessing, device: torch.device | str = "cpu", seed: int = 0,
              say: Callable[[str], None] = log.info) -> Scope | None:
    """The scope of ``model`` (module docstring); ``None``, with the reason logged, if it cannot be fitted."""
    records = _identity(train)
    if len(records) > MAX_FIT_IMAGES:
        records = random.Random(seed).sample(records, MAX_FIT_IMAGES)
    was_training = model.training
    model.eval()
    try:
        x, y = image_features(model, records, preprocessing, device)
        val_x, _ = image_features(model, _identity(val), preprocessing, device)
        scope = Scope.fit(x, y, val_x)
    except BreastvisionError as err:
        log.warning(f"no scope in the model file: {err}")
        return None
    finally:
        model.train(was_training)
    say(f"scope: Mahalanobis on {len(x)} training images' {x.shape[1]}-d features, "
        f"threshold {scope.threshold:.4g} ({scope.threshold_from} of {len(val_x)})")
    return scope
