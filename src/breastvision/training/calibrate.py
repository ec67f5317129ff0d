"""After training: a temperature fitted on the best weights' validation logits, and malignant-vs-rest
operating points chosen on the *calibrated* validation probabilities, both stored in the model file.

The temperature changes no arg-max, so model selection (on uncalibrated validation scores) and the
accuracy are unaffected; the thresholds are chosen after it because they are read against the
calibrated probabilities every predictor returns. Operating points need a positive class
(``operating_points.has_positive_class``: a binary task, or a class named like "malignant"); a
task without one (LC25000's five tissues) gets none, and so does a validation part lacking
positive or negative images, with a logged reason rather than a failed run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import TEMPERATURE_RANGE, TemperatureScaler
from breastvision.evaluation.operating_points import choose_operating_points, has_positive_class

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
    say: Callable[[str], None] = log.info,
) -> Calibrated:
    """Fit the temperature on validation logits (one row per validation item) and choose the
    operating points on the calibrated probabilities (module docstring)."""
    logits, labels = val_logits.double().numpy(), np.asarray(val_labels)
    scaler = TemperatureScaler().fit(logits, labels)
    calibration = {**scaler.to_dict(), "fitted_on": "validation", "n_images": int(labels.size)}
    say(f"temperature scaling on {labels.size} validation images: T = {scaler.temperature_:.3f}, "
        f"NLL {scaler.nll_before_:.4f} -> {scaler.nll_after_:.4f}")
    if not TEMPERATURE_RANGE[0] * 1.01 < scaler.temperature_ < TEMPERATURE_RANGE[1] / 1.01:
        # A separable validation set drives T to the lower end (NLL -> 0), a hopeless one to the upper.
        log.warning(f"the temperature {scaler.temperature_:.3g} is at the end of the searched range "
                    f"{TEMPERATURE_RANGE}: too few or too easy validation images to calibrate on")
    if not has_positive_class(class_names):
        say(f"no operating points: none of {list(class_names)} is a positive (malignant) class")
        return Calibrated(calibration, None)
    try:
        points = choose_operating_points(labels, scaler.transform(logits), class_names)
    except BreastvisionError as err:
        log.warning(f"no operating points: {err}")
        return Calibrated(calibration, None)
    say("operating points (validation): " + ", ".join(
        f"{name} at {t:.4g}" for name, t in points["thresholds"].items()))
    return Calibrated(calibration, points)
