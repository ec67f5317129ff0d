"""The Python API: load a model file, predict, explain, evaluate; train from a config.

Everything here is also reachable as ``breastvision.<name>`` (imported on first use, so that
``import breastvision`` and ``breastvision --help`` stay fast)::

    import breastvision

    model = breastvision.load_model("runs/busi_f1/model.safetensors")   # or an .onnx export
    result = model.predict("image.png")           # a path, a PIL image or an H×W(×3) uint8 array
    result.label, result.probabilities            # 'benign', {'benign': 0.91, ...}
    result.decisions                              # {'sensitivity>=0.95': False, 'youden': False}
    breastvision.load_model(path, operating_point="youden").predict("image.png").decision
    model.predict_folder("folder/")               # every image below, bad files listed as skipped
    model.explain("image.png").overlay            # Grad-CAM heat-map over the image (PIL)
    model.evaluate("busi", split="runs/busi_f1/split.json").metrics["accuracy"]

    run = breastvision.train("configs/busi_fusion_cpu_noaug.yaml", ["train.epochs=1"], out="runs/x")
    run.metrics["accuracy"], run.model_file       # a RunRecord

The pre-processing (input size, resize, mean/std, the fitted stain normaliser) comes from the
model file, exactly as training evaluated; nothing needs to be repeated by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from breastvision.errors import BreastvisionError

if TYPE_CHECKING:
    from breastvision.evaluation.evaluate import Evaluation
    from breastvision.explanation.gradcam import Explanation as HeatMaps
    from breastvision.serving.predict import PredictionRun, Predictor
    from breastvision.training.config import ExperimentConfig
    from breastvision.training.run_record import RunRecord

#: What :meth:`Model.predict` and :meth:`Model.explain` accept as one image.
ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class Result:
    """One image's prediction: the most probable class, every class's (calibrated) probability and,
    for a model file with operating points, whether each calls the image malignant; ``decision`` is
    ``label``, or the call at the operating point :func:`load_model` was given."""

    label: str
    probabilities: dict[str, float]
    decisions: dict[str, bool] = field(default_factory=dict)
    #: For a model file with a scope (``models.scope``) or its ONNX export: whether the image lies
    #: outside it, and its score; ``None`` without one (or from an ONNX file exported before the
    #: graph carried the score).
    out_of_scope: bool | None = None
    scope_score: float | None = None
    decision: str = ""


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM for one image: the class explained, the heat-maps (H×W in [0, 1] at the model's
    input size, primary map first) and the primary map blended over the image."""

    label: str
    heatmaps: dict[str, np.ndarray]
    overlay: Image.Image


def as_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a file path (read safely, ``data.io.load_image``), a PIL image, or a
    ``uint8`` array of shape H×W (grey) or H×W×3 (RGB)."""
    from breastvision.data.io import load_image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise BreastvisionError(
                f"an image array must be uint8 H×W or H×W×3, got {image.dtype} {image.shape}"
            )
        return Image.fromarray(image).convert("RGB")
    return load_image(image)


class Model:
    """A trained model, from its model file (``.safetensors``, PyTorch) or ONNX export."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor

    @property
    def class_names(self) -> list[str]:
        return list(self._predictor.class_names)

    @property
    def path(self) -> Path:
        return self._predictor.source

    def card(self) -> dict[str, Any]:
        """The model card: architecture, classes, pre-processing, lineage, metrics, file hash."""
        return self._predictor.card()

    def predict(self, image: ImageInput, *, tta: bool | str = False) -> Result:
        """Class probabilities of one image; ``tta=True`` averages the model file's own test-time
        view set (``hflip`` for ultrasound models, ``dihedral8`` for histology: ``card()["tta"]``),
        ``tta="hflip"`` or ``"dihedral8"`` that set."""
        tensor = self._predictor.preprocess(as_image(image)).unsqueeze(0)
        rows, scores, _ = self._predictor.assess(tensor, tta=tta)
        p = self._predictor.judge("image", Path("image"), rows[0], None if scores is None else scores[0])
        return Result(p.predicted, p.probabilities, p.decisions, p.out_of_scope, p.scope_score, p.decision)

    def predict_folder(
        self, *paths: str | os.PathLike, tta: bool | str = False, batch_size: int = 8,
        patient_context: float = 0.0,
    ) -> PredictionRun:
        """Every image under the files and folders given (``serving.predict.predict_paths``):
        ``.predictions`` (name, path, probabilities, predicted), ``.skipped`` (path, reason) and
        ``.tta`` (the view set averaged; ``tta`` as for :meth:`predict`). ``patient_context``: each
        image blended with the mean of its folder's images, one folder per patient."""
        from breastvision.serving.predict import predict_paths

        return predict_paths(self._predictor, paths, tta=tta, batch_size=batch_size,
                             patient_context=patient_context)

    def explain(
        self, image: ImageInput, *, target: str | None = None, method: str = "gradcam"
    ) -> Explanation:
        """Grad-CAM heat-maps for ``target`` (a class name; default: the predicted class). Needs
        the ``.safetensors`` model file (an ONNX export has no gradients)."""
        from breastvision.explanation.gradcam import explain, overlay

        if not self._predictor.can_explain:
            raise BreastvisionError("explanations need the .safetensors model file, not an ONNX export")
        if target is not None and target not in self.class_names:
            raise BreastvisionError(f"unknown class {target!r}; the model knows {self.class_names}")
        picture = as_image(image)
        tensor = self._predictor.preprocess(picture)
        maps: HeatMaps = explain(
            self._predictor.model, tensor, architecture=self._predictor.info.architecture,
            target=None if target is None else self.class_names.index(target), method=method,
        )
        blended = overlay(picture, maps.primary, self._predictor.preprocessing)
        return Explanation(self.class_names[maps.target], dict(maps.heatmaps), blended)

    def evaluate(self, source: str, **options: Any) -> Evaluation:
        """Metrics with bootstrap intervals and a report folder on a dataset name, folder or
        manifest; ``options`` are :func:`breastvision.evaluation.evaluate.evaluate_model`'s
        (``data``, ``split``, ``subset``, ``fold``, ``out``, ``tta``, ``device``, ...)."""
        from breastvision.evaluation.evaluate import evaluate_model

        return evaluate_model(self.path, source, **options)


def load_model(path: str | os.PathLike, *, device: str = "cpu", operating_point: str | None = None) -> Model:
    """A :class:`Model` from a model file written by training or its ONNX export, on ``device``
    (``auto``, ``cpu``, ``cuda[:N]``); ``operating_point``: the stored operating point
    ``Result.decision`` follows (``None``: the most probable class)."""
    from breastvision.serving.predict import load_predictor

    return Model(load_predictor(path, device, operating_point))


def train(
    config: str | os.PathLike | ExperimentConfig,
    overrides: Sequence[str] = (),
    *,
    out: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
) -> RunRecord:
    """Train one run from a YAML config (a path, or a shipped config's file name) with
    ``key=value`` overrides, or from an ``ExperimentConfig``; returns the finished run's record."""
    from breastvision.training.config import load_config
    from breastvision.training.engine import train as train_config

    if not hasattr(config, "to_dict"):
        config = load_config(config, list(overrides))
    elif overrides:
        raise BreastvisionError("overrides apply to a config file; change an ExperimentConfig directly")
    return train_config(config, resume=resume, out=out)
