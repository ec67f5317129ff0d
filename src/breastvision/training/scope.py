"""After training: the model's scope (``models.scope``) fitted on the pooled features of the training
images, standardised and thresholded on the validation images, stored in the model file.

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
from pathlib import Path

import numpy as np
import torch

from breastvision.data.io import load_image
from breastvision.data.transforms import preprocess_image
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing
from breastvision.models.scope import FeatureTap, Scope, default_layers, tapped
from breastvision.serving.predict import batched
from breastvision.training.views import Item

log = logging.getLogger(__name__)

MAX_FIT_IMAGES = 1000
_BATCH = 32


def image_features(tap: FeatureTap, records: Sequence[tuple[str, int]], preprocessing: Preprocessing,
                   device: torch.device | str = "cpu") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per layer of ``tap``, the pooled features (N×D) of ``(path, label)`` records, and their labels;
    unreadable files are left out."""
    features: dict[str, list[np.ndarray]] = {name: [] for name in tap.layers}
    labels = []
    for batch in batched(records, _BATCH):
        tensors, kept = [], []
        for path, label in batch:
            try:
                tensors.append(preprocess_image(load_image(path), preprocessing))
                kept.append(label)
            except BreastvisionError as err:
                log.warning(f"scope: leaving out {path}: {err}")
        if tensors:
            for name, rows in tap.features(torch.stack(tensors).to(device))[1].items():
                features[name].append(rows)
            labels.extend(kept)
    if not labels:
        raise BreastvisionError("scope: no readable images")
    return {name: np.concatenate(rows) for name, rows in features.items()}, np.asarray(labels)


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
        with tapped(model, default_layers(model)) as tap:
            x, y = image_features(tap, records, preprocessing, device)
            val_x, _ = image_features(tap, _identity(val), preprocessing, device)
        scope = Scope.fit(x, y, val_x)
    except BreastvisionError as err:
        log.warning(f"no scope in the model file: {err}")
        return None
    finally:
        model.train(was_training)
    dims = "+".join(str(rows.shape[1]) for rows in x.values())
    say(f"scope: Mahalanobis on {len(y)} training images' features at {len(x)} layers ({dims}-d), "
        f"threshold {scope.threshold:.4g} ({scope.threshold_from} of {scope.n_validation})")
    return scope


def refit_scope(run_dir: str | Path, out: str | Path, device: torch.device | str = "cpu") -> Path:
    """A copy of a run folder's model file at ``out`` with its scope fitted afresh by this release on
    the run's own training and validation images (its ``config.yaml`` and ``split.json``), the weights
    unchanged: to compare scope methods on one model, or to give an older file this release's scope."""
    from breastvision.models.bundle import ModelBundle
    from breastvision.training.config import load_config
    from breastvision.training.data_setup import prepare_data

    run_dir = Path(run_dir)
    bundle = ModelBundle.load(run_dir / "model.safetensors")
    config = load_config(run_dir / "config.yaml", [f"data.split.file={run_dir / 'split.json'}"])
    data = prepare_data(config)
    model = bundle.build_model().to(device)
    bundle.scope = fit_scope(model, data.train, data.val, bundle.preprocessing, device, config.train.seed)
    if bundle.scope is None:
        raise BreastvisionError(f"{run_dir}: no scope could be fitted (see the warning above)")
    return bundle.save(out)
