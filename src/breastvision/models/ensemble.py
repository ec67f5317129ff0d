"""Ensembles: several model files in one, predicting the mean of their members' calibrated probabilities.

An ensemble file is a model file (``ModelBundle``) whose metadata names architecture ``ensemble`` and
holds ``{"ensemble": {"members": [member metadata, ...], "combine": ...}}``; member ``i``'s weights
are stored under the prefix ``member{i}.``. Each member keeps its own architecture, weights and
calibration temperature. Members must share class names (in order) and pre-processing: one input
tensor feeds them all, so that an ensemble is one network to every consumer (predict, evaluate, the
web app, the Python API, one ONNX graph). Members trained with different pre-processing are refused
rather than silently fed another's input.

:class:`EnsembleNetwork` returns the log of the mean of ``softmax(member(x) / T_member)``: a
softmax of that is the mean itself, so code that soft-maxes a network's output (calibration with the
ensemble's own temperature of 1, the ONNX export's final softmax) gets the averaged probabilities.

The members' operating points are not carried over: they were chosen on each member's validation
probabilities, not on the mean's. An ensemble file has no temperature or operating points of its
own unless they are fitted on labelled images none of its members trained or validated on
(``ensemble_files(..., calibrate_on=DATA)``, ``training.calibrate.calibrate_on_data``): a
temperature on the log of the mean (1 without one) and malignant-vs-rest thresholds on the
resulting probabilities, applied by every predictor as for a single model. A cross-validation's
folds cannot give them (each image is in some member's training data). Nor are
their out-of-scope statistics (``models.scope``): each member's were fitted on its own features, and
an ensemble's flag would need a rule for combining them, so an ensemble file has no scope flag.
Its test-time augmentation set (``--tta``) is its members' when they agree, else the one whose
views they all accept (``models.tta.common_tta``: a histology member's 8 views include an
ultrasound member's two).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import MODEL_FILE_NAME, ModelBundle
from breastvision.models.tta import common_tta

ARCHITECTURE = "ensemble"
COMBINE = "mean of calibrated probabilities"
#: What ``crossval --ensemble`` writes beside the folds.
ENSEMBLE_FILE_NAME = "ensemble.safetensors"


class EnsembleNetwork(nn.Module):
    """Log of the mean of the members' temperature-scaled softmaxes."""

    def __init__(self, members: Sequence[nn.Module], architectures: Sequence[str],
                 temperatures: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.architectures = list(architectures)
        self.register_buffer("temperatures", torch.tensor(list(temperatures), dtype=torch.float32))

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """M×B×K: each member's calibrated probabilities."""
        return torch.stack([torch.softmax(m(x).float() / t, dim=1)
                            for m, t in zip(self.members, self.temperatures, strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Clamped so that a class every member rules out stays finite in log-losses.
        return self.member_probabilities(x).mean(dim=0).clamp_min(torch.finfo(torch.float32).tiny).log()


def members(bundle: ModelBundle) -> list[ModelBundle]:
    """The member bundles of an ensemble bundle, each with its own weights."""
    found = []
    for i, meta in enumerate(bundle.ensemble["members"]):
        prefix = f"member{i}."
        weights = {k.removeprefix(prefix): v for k, v in bundle.state_dict.items() if k.startswith(prefix)}
        found.append(ModelBundle.from_metadata(meta, weights, bundle.source or f"ensemble member {i}"))
    return found


def build_network(bundle: ModelBundle) -> EnsembleNetwork:
    parts = members(bundle)
    return EnsembleNetwork([b.build_model() for b in parts], [b.architecture for b in parts],
                           [b.temperature for b in parts]).eval()


def _model_file(path: str | Path) -> Path:
    """A run folder's model file, or the path itself."""
    path = Path(path)
    return path / MODEL_FILE_NAME if path.is_dir() and (path / MODEL_FILE_NAME).is_file() else path


def _flatten(bundles: Sequence[ModelBundle]) -> list[ModelBundle]:
    """Ensembles given as inputs contribute their members: an ensemble of ensembles is a flat one."""
    return [m for b in bundles for m in (members(b) if b.ensemble else [b])]


def combine(bundles: Sequence[ModelBundle], names: Sequence[str] | None = None) -> ModelBundle:
    """One ensemble bundle of ``bundles`` (named ``names`` in errors); a one-line error when they do
    not share class names or pre-processing."""
    names = list(names or [str(b.source or f"model {i + 1}") for i, b in enumerate(bundles)])
    parts = _flatten(bundles)
    if len(parts) < 2:
        raise BreastvisionError(f"an ensemble needs at least 2 models, got {len(parts)}")
    first = parts[0]
    for i, other in enumerate(parts[1:], 1):
        where = names[i] if len(names) == len(parts) else f"member {i + 1}"
        if other.class_names != first.class_names:
            raise BreastvisionError(f"{where}: class names {other.class_names} differ from "
                                    f"{first.class_names}; ensemble members must share them, in order")
        if other.preprocessing != first.preprocessing:
            raise BreastvisionError(f"{where}: pre-processing differs from the first model's; ensemble "
                                    "members must share it (one input tensor feeds them all)")
    state = {f"member{i}.{k}": v for i, b in enumerate(parts) for k, v in b.state_dict.items()}
    return ModelBundle(
        architecture=ARCHITECTURE, class_names=list(first.class_names), state_dict=state,
        preprocessing=first.preprocessing,
        lineage=[{"stage": "ensemble", "members": names}],
        ensemble={"members": [_without_scope(b.metadata()) for b in parts], "combine": COMBINE},
        tta=common_tta(b.default_tta for b in parts),
    )


def _without_scope(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "scope"}  # module docstring: not carried over


def ensemble_files(inputs: Sequence[str | Path], out: str | Path, *, calibrate_on: str | None = None,
                   data: str | None = None, device: str = "cpu") -> Path:
    """Combine model files or run folders ``inputs`` into the ensemble file ``out``; with
    ``calibrate_on`` (a labelled dataset name, folder or manifest; ``data``: the data root for names),
    its temperature and operating points fitted there (module docstring)."""
    paths = [_model_file(p) for p in inputs]
    bundles = [ModelBundle.load(p) for p in paths]
    bundle = combine(bundles, [str(p) for p in paths] if not any(b.ensemble for b in bundles) else None)
    bundle.build_model()  # every member must build before the file is written
    if calibrate_on is not None:
        from breastvision.training.calibrate import calibrate_on_data

        fitted = calibrate_on_data(bundle, calibrate_on, data=data, device=device)
        bundle.calibration, bundle.operating_points = fitted.calibration, fitted.operating_points
    return bundle.save(out)
