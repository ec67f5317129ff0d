"""After training: a temperature fitted on the best weights' validation logits, and malignant-vs-rest
operating points chosen on the *calibrated* validation probabilities, both stored in the model file.

The temperature changes no arg-max, so model selection (on uncalibrated validation scores) and the
accuracy are unaffected; the thresholds are chosen after it because they are read against the
calibrated probabilities every predictor returns. Operating points need a positive class
(``operating_points.has_positive_class``: a binary task, or a class named like "malignant"); a
task without one (LC25000's five tissues) gets none, and so does a validation part lacking
positive or negative images, with a logged reason rather than a failed run.

:func:`calibrate_on_data` fits the same two on any labelled dataset, folder or manifest through the
one predictor (``serving.predict``): how an ensemble file gets its own temperature and operating
points (``breastvision ensemble --calibrate-on``), on images none of its members trained or
validated on (:func:`check_unseen` refuses those its members' split files name).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from breastvision.data.records import Catalog
from breastvision.data.splits import VIEW_SEPARATOR, Split
from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import TEMPERATURE_RANGE, TemperatureScaler
from breastvision.evaluation.operating_points import choose_operating_points, has_positive_class
from breastvision.models.bundle import ModelBundle

log = logging.getLogger(__name__)


@dataclass
class Calibrated:
    """What the model file stores: ``models.bundle.Calibration`` and ``OperatingPoints`` as dicts."""

    calibration: dict[str, Any]
    operating_points: dict[str, Any] | None

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"])


def calibrate(
    val_logits: torch.Tensor, val_labels: Sequence[int], class_names: Sequence[str],
    say: Callable[[str], None] = log.info, fitted_on: str = "validation",
) -> Calibrated:
    """Fit the temperature on validation logits (one row per validation item, or a V×N×K stack of
    test-time augmentation views, whose probabilities are the views' mean as the predictors'
    are: ``evaluation.calibration``) and choose the operating points on the calibrated
    probabilities (module docstring); ``fitted_on`` names the images in the model file and the log."""
    logits, labels = val_logits.double().numpy(), np.asarray(val_labels)
    scaler = TemperatureScaler().fit(logits, labels)
    calibration = {**scaler.to_dict(), "fitted_on": fitted_on, "n_images": int(labels.size)}
    say(f"temperature scaling on {labels.size} {fitted_on} images: T = {scaler.temperature_:.3f}, "
        f"NLL {scaler.nll_before_:.4f} -> {scaler.nll_after_:.4f}")
    if not TEMPERATURE_RANGE[0] * 1.01 < scaler.temperature_ < TEMPERATURE_RANGE[1] / 1.01:
        # A separable validation set drives T to the lower end (NLL -> 0), a hopeless one to the upper.
        log.warning(f"the temperature {scaler.temperature_:.3g} is at the end of the searched range "
                    f"{TEMPERATURE_RANGE}: too few or too easy {fitted_on} images to calibrate on")
    if not has_positive_class(class_names):
        say(f"no operating points: none of {list(class_names)} is a positive (malignant) class")
        return Calibrated(calibration, None)
    try:
        points = choose_operating_points(labels, scaler.transform(logits), class_names)
    except BreastvisionError as err:
        log.warning(f"no operating points: {err}")
        return Calibrated(calibration, None)
    say(f"operating points ({fitted_on}): " + ", ".join(
        f"{name} at {t:.4g}" for name, t in points["thresholds"].items()))
    return Calibrated(calibration, points)


def _trained_on(split: Split, fold: int | None) -> set[str]:
    """The relative paths a run with ``split`` (and ``fold``, for k-fold splits) trained or validated on."""

    def used(part: str | int) -> bool:
        return part != fold if split.k is not None else part in ("train", "val")

    return {key.split(VIEW_SEPARATOR)[0] for key, part in split.assignment.items() if used(part)}


def check_unseen(bundle: ModelBundle, catalog: Catalog) -> None:
    """Refuse calibration images that a member of ``bundle`` (each model of an ensemble) trained or
    validated on, by the split file its lineage names when that split is of the same dataset and
    still readable (a member without one is not checked, with a warning)."""
    members = bundle.ensemble["members"] if bundle.ensemble else [bundle.metadata()]
    rels = {catalog.relpath(r) for r in catalog.records}
    for i, member in enumerate(members, 1):
        stage = (member.get("lineage") or [{}])[-1]
        file = (stage.get("split") or {}).get("file")
        if not file or not Path(file).is_file():
            log.warning(f"member {i}: no split file recorded or found; not checked against the "
                        "calibration data")
            continue
        split = Split.load(file)
        same_data = split.dataset == catalog.name
        seen = rels & _trained_on(split, stage["split"].get("fold")) if same_data else set()
        if seen:
            raise BreastvisionError(
                f"{len(seen)} of the {len(rels)} calibration images were in member {i}'s training or "
                f"validation data ({file}), e.g. {sorted(seen)[0]}: calibrate on images no member has seen")


def calibrate_on_data(bundle: ModelBundle, source: str, *, data: str | None = None, device: str = "cpu",
                      batch_size: int = 32, say: Callable[[str], None] = log.info) -> Calibrated:
    """The temperature and operating points of ``bundle`` fitted on the labelled ``source`` (a dataset
    name, image folder or manifest; ``data``: the data root for names), scored by the one predictor
    with the file's current temperature set aside (module docstring)."""
    from dataclasses import replace

    from breastvision.data.readers import read_dataset
    from breastvision.devices import resolve_device
    from breastvision.evaluation.evaluate import class_mapping
    from breastvision.serving.predict import TorchPredictor, score_items

    catalog = read_dataset(source, root=data)
    check_unseen(bundle, catalog)
    mapping = class_mapping(catalog.class_names, bundle.class_names, {r.label for r in catalog.records})
    plain = replace(bundle, calibration=None, operating_points=None)
    predictor = TorchPredictor(plain, Path(bundle.source or source), resolve_device(device))
    scored = score_items(predictor, [(r.path, None) for r in catalog.records], batch_size=batch_size)
    for index, reason in sorted(scored.failures.items()):
        log.warning(f"calibration: left out {catalog.records[index].path}: {reason}")
    labels = mapping[[r.label for i, r in enumerate(catalog.records) if i not in scored.failures]]
    if labels.size < 2:
        raise BreastvisionError(f"{source}: {labels.size} readable labelled images, too few to calibrate on")
    # Log-probabilities are logits up to a per-image constant, which a temperature leaves alone.
    logits = torch.from_numpy(np.log(np.clip(scored.uncalibrated, np.finfo(np.float32).tiny, None)))
    return calibrate(logits, labels, bundle.class_names, say, fitted_on=f"{catalog.name} ({source})")
