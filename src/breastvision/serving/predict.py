"""Class probabilities for image files and folders, from a model file or its ONNX export.

Both back-ends read everything but the weights from the model's own metadata (class names, input
size, resize, mean/std, the fitted stain normaliser) and prepare every image with
``data.transforms.preprocess_image`` — the one function training used for evaluation — so a
prediction never depends on flags the user has to remember.

Choices recorded here:

- **Discovery.** Folders are searched recursively for image extensions (``data.io.IMAGE_EXTENSIONS``)
  in sorted order, by the readers' own walk (``data.readers._common.walk_files``); BUSI lesion masks
  (``*_mask*``) are not samples and are counted, not predicted. Other regular files in a folder
  (manifests, READMEs) are not inputs and are passed over; symbolic-link loops, dangling links, links
  to folders (not followed), FIFOs and devices are listed as skipped whatever their name, as is a
  folder given that holds no image file. A file named explicitly is always tried, whatever its
  extension, and reported if it is not an image.
- **File names that are not valid UTF-8** are written to the CSV and JSON results with those bytes
  as ``\\xNN`` escapes (``paths.printable``), so the results stay valid UTF-8 whatever the disk holds.
- **Frames.** A multi-frame DICOM (cine) file is predicted frame by frame, each reported as
  ``name.dcm#frame=K`` (frames from 1, ``data.dicom``); ``frame=K`` predicts only frame K of each
  such file (one with fewer frames is a listed skip), and an input may name one frame itself
  (``cine.dcm#frame=3``). Single-frame images are predicted as they are.
- **Bad files** (unreadable, not an image, truncated, too small, a decompression bomb, a stain
  normaliser failure) become ``Skipped(path, reason)`` entries, listed with the results.
- **Test-time augmentation** averages the softmax probabilities over a named view set
  (``data.transforms.TTA_VIEWS``, by ``data.transforms.view_logits``): ``dihedral8``, the 8 rotations
  and flips under which a histopathology field keeps its class, or ``hflip``, the image and its
  mirror, all an ultrasound allows (its depth axis runs top-down). ``tta=True`` (``--tta``) takes the
  model file's own set (``ModelBundle.default_tta``: ``hflip`` for ultrasound models, ``dihedral8``
  for histology), a set's name (``--tta-views``) overrides it, and every output names the set it
  averaged (:meth:`Predictor.resolve_tta`). Averaging probabilities rather than logits keeps every
  view's vote bounded.
- **ONNX** exports (``serving.export``) end in a softmax, so onnxruntime returns probabilities;
  an export of a file with a scope also returns each image's scope score (output ``scope_score``).
- **Calibration.** Probabilities are ``softmax(logits / T)`` with the model file's fitted temperature
  ``T`` (1 for files without one), in :meth:`Predictor.assess`, the one place every consumer
  (predict, evaluate, the training engine's test pass, web, the Python API, slides) goes through; it
  also gives the probabilities at ``T = 1`` (reports show calibration before and after). The ONNX
  graph stays uncalibrated; its predictor applies ``T`` from the metadata the export carries, to the
  graph's log-probabilities.
- **Decisions.** A model file with operating points (malignant-vs-rest thresholds chosen on
  validation) adds, per image, whether ``P(malignant) >= threshold`` at each of them. The
  ``decision`` is the most probable class (``argmax``, the default), or with an operating point
  chosen (``--operating-point NAME``), the positive class when ``P(positive) >= its threshold``,
  else the most probable of the others. :class:`Judge` is the one place that turns probabilities
  into a :class:`Prediction` (label, decision, decisions, scope flag).
- **One table.** :func:`write_predictions_csv` is the only writer of per-image predictions
  (``predict``, ``evaluate``, training runs, cross-validation): ``path``, then ``true_label``,
  ``group`` and ``subtype`` (blank when the data names none) where labels are known,
  ``predicted``, ``decision``, ``p_<class>``, one column per operating point, ``out_of_scope``,
  ``scope_score``, ``skipped``.
- **Scope.** A model file with a fitted scope (``models.scope``) adds, per image, ``scope_score``
  (the sum over the scope's layers of its standardised Mahalanobis distances to the training
  images' statistics; older files: the distance of the penultimate features alone) and
  ``out_of_scope`` (score above the stored threshold): an image so flagged is "outside this model's
  scope" and its label should not be trusted. The score is of the image as given (identity view),
  also under TTA, by either back-end: an ONNX export computes it in its graph. A file without a
  scope, and an ONNX file exported before the graph carried the score, leave both CSV cells blank,
  so the CSV has one shape.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from breastvision.data import dicom
from breastvision.data.io import BadImageError, file_problem, is_image_file, load_image
from breastvision.data.readers._common import walk_files
from breastvision.data.records import Skipped
from breastvision.data.transforms import apply_view, preprocess_image, tta_views, view_logits
from breastvision.errors import BreastvisionError, one_line
from breastvision.models.bundle import ModelBundle, Preprocessing, check_model_path, scope_description
from breastvision.paths import file_sha256, printable

log = logging.getLogger(__name__)

#: Lesion masks in the BUSI layout (``benign (3)_mask.png``, ``benign (3)_mask_1.png``).
MASK_PATTERN = "*_mask*"
#: Key of the model metadata in an ONNX file's ``metadata_props``, as in the model file.
ONNX_METADATA_KEY = "breastvision"
#: Key of the scope's metadata in an ONNX export of a file with a scope (``serving.export``).
SCOPE_METADATA_KEY = f"{ONNX_METADATA_KEY}_scope"
#: The ONNX graph's input and outputs (``serving.export``); ``scope_score`` only with a scope.
INPUT_NAME, OUTPUT_NAME, SCOPE_OUTPUT = "image", "probabilities", "scope_score"
#: What a caller asks of test-time augmentation: ``True`` the model file's own view set, a set's name
#: (``dihedral8``, ``hflip``), ``False`` / ``None`` none (:meth:`Predictor.resolve_tta`).
TtaChoice = bool | str | None


def is_mask(path: Path) -> bool:
    return fnmatch.fnmatch(path.stem.lower(), MASK_PATTERN)


@dataclass
class Discovery:
    """The images found under the inputs (each with the name it is reported under) and the rest."""

    images: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    masks: int = 0


def _frames(path: Path, name: str, frame: int | None, skipped: list[Skipped]) -> list[tuple[Path, str]]:
    """The (path, name) of each frame to predict of one image file (see the module docstring)."""
    if dicom.split_frame(path)[1] is not None or not dicom.is_dicom(path):
        return [(path, name)]
    try:
        frames = dicom.read_info(path).frames
    except BadImageError:
        return [(path, name)]  # loading it says why
    if frames == 1:
        return [(path, name)]
    if frame is not None and frame > frames:
        skipped.append(Skipped(path, f"frame {frame} asked for, but the file has {frames}"))
        return []
    chosen = range(1, frames + 1) if frame is None else [frame]
    return [(dicom.frame_path(path, k), f"{name}{dicom.FRAME_MARK}{k}") for k in chosen]


def discover_images(inputs: Iterable[str | os.PathLike], frame: int | None = None) -> Discovery:
    """Image files under files and folders, by the rules in the module docstring; ``frame``: the
    frame of multi-frame DICOM files to predict (None: every frame).

    The reported name of a file found in a folder is its path relative to that folder's parent
    (``benign/benign (1).png``), unique across inputs; an explicit file keeps its own name.
    """
    found = Discovery()
    seen: set[str] = set()
    for raw in inputs:
        root = Path(raw)
        if root.is_dir():
            candidates = _folder_candidates(root, found.skipped)
            base = Path(os.path.abspath(root)).parent
        elif root.exists() or root.is_symlink() or dicom.split_frame(root)[0].exists():
            candidates, base = [root], None
        else:
            found.skipped.append(Skipped(root, "no such file or folder"))
            continue
        for path in candidates:
            # realpath, not Path.resolve: it raises on a link loop, which is reported when loaded.
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            if is_mask(path):
                if base is None:
                    found.skipped.append(Skipped(path, "a lesion mask (*_mask*), not a sample"))
                else:
                    found.masks += 1
                continue
            # Named by where it was found, not where a link points (possibly outside the folder).
            name = str(Path(os.path.abspath(path)).relative_to(base)) if base else str(path)
            found.images.extend(_frames(path, name, frame, found.skipped))
    return found


def _folder_candidates(folder: Path, skipped: list[Skipped]) -> list[Path]:
    """The files below ``folder`` with an image extension; entries that are not regular files and
    have no image extension (those that have one are reported when loaded) go to ``skipped``."""
    candidates, listed = [], len(skipped)
    for path in sorted(walk_files(folder)):  # by full path, as results have always been ordered
        if is_image_file(path):
            candidates.append(path)
        elif problem := file_problem(path):
            skipped.append(Skipped(path, problem))
    if not candidates and len(skipped) == listed:
        skipped.append(Skipped(folder, "folder holds no image files"))
    return candidates


class Assessment(NamedTuple):
    """What a predictor makes of a batch: B×K calibrated probabilities, each image's scope score
    (``None`` without a scope) and the probabilities at ``T = 1``."""

    probs: np.ndarray
    scores: np.ndarray | None
    uncalibrated: np.ndarray


#: The decision rule without an operating point: the most probable class.
ARGMAX = "argmax"


@dataclass(frozen=True)
class Judge:
    """Probabilities (and a scope score) → a :class:`Prediction` (module docstring, "Decisions")."""

    class_names: list[str]
    operating_points: dict[str, Any] | None = None
    #: The stored operating point the ``decision`` follows (``None``: argmax).
    operating_point: str | None = None
    scope_threshold: float | None = None

    def __post_init__(self) -> None:
        stored = list(self.operating_points["thresholds"]) if self.operating_points else []
        if self.operating_point is not None and self.operating_point not in stored:
            known = f"the stored ones: {', '.join(stored)}" if stored else "the model file stores none"
            raise BreastvisionError(f"--operating-point '{self.operating_point}' is unknown; {known}")

    @property
    def rule(self) -> str:
        return self.operating_point or ARGMAX

    def decision(self, probabilities: dict[str, float]) -> str:
        best = max(self.class_names, key=probabilities.__getitem__)
        if self.operating_point is None:
            return best
        positive = self.operating_points["positive_class"]
        if probabilities[positive] >= self.operating_points["thresholds"][self.operating_point]:
            return positive
        return max((c for c in self.class_names if c != positive), key=probabilities.__getitem__)

    def __call__(self, name: str, path: Path, row: Sequence[float], score: float | None = None, *,
                 true_label: str | None = None, group: str | None = None,
                 subtype: str | None = None) -> Prediction:
        probabilities = dict(zip(self.class_names, map(float, row), strict=True))
        best = max(self.class_names, key=probabilities.__getitem__)
        prediction = Prediction(name, path, probabilities, best, decision=self.decision(probabilities),
                                decisions=decide(probabilities, self.operating_points),
                                true_label=true_label, group=group, subtype=subtype)
        if score is not None and self.scope_threshold is not None:
            prediction.scope_score = float(score)
            prediction.out_of_scope = bool(score > self.scope_threshold)  # models.scope.Scope.outside
        return prediction


class Predictor(ABC):
    """A model ready to turn pre-processed batches into class probabilities and predictions."""

    #: The model file's metadata; for ONNX, a bundle without weights.
    info: ModelBundle
    source: Path
    backend: str
    can_explain = False
    #: The stored operating point decisions follow (``None``: argmax); set by :meth:`use_operating_point`.
    operating_point: str | None = None

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @property
    def judge(self) -> Judge:
        scope = self.info.scope
        return Judge(self.class_names, self.info.operating_points, self.operating_point,
                     None if scope is None else scope.threshold)

    def use_operating_point(self, name: str | None) -> Predictor:
        """Make decisions follow the stored operating point ``name`` (``None``: argmax); an unknown
        name is a one-line error listing the stored ones."""
        self.operating_point = Judge(self.class_names, self.info.operating_points, name).operating_point
        return self

    @abstractmethod
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """B×K float32 logits (or log-probabilities: the softmax treats them alike) for one
        B×C×H×W batch, before calibration."""

    @abstractmethod
    def scored(self, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """B×K logits (as :meth:`logits`) and the scope scores of one batch (``None`` without a
        scope), in one forward pass."""

    def _view_logits(self, batch: torch.Tensor,
                     views: Sequence[str]) -> tuple[torch.Tensor, np.ndarray | None]:
        """V×B×K logits of each view and, where the model has a scope, the scores of the images as given."""
        if self.info.scope is None:
            return view_logits(self.logits, batch, views), None
        # One pass gives the image's logits and its scores; the other views need only logits.
        logits, scores = self.scored(batch)
        rest = [self.logits(apply_view(batch, v)) for v in views if v != "identity"]
        return torch.stack([logits, *rest]), scores

    def resolve_tta(self, tta: TtaChoice) -> str | None:
        """The name of the view set ``tta`` asks for (:data:`TtaChoice`): ``True`` the model file's
        own (``ModelBundle.default_tta``), a name itself (checked), ``False`` / ``None``: none."""
        if tta is True:
            return self.info.default_tta
        if not tta:
            return None
        tta_views(tta)  # an unknown name is a one-line error
        return str(tta)

    def tta_card(self) -> dict[str, Any]:
        """The view set ``--tta`` averages for this model, its views, and whether the file records
        it (else it follows from the modality the file records: ``models.tta``)."""
        name = self.info.default_tta
        return {"set": name, "views": list(tta_views(name)), "recorded": self.info.tta is not None}

    def assess(self, batch: torch.Tensor, tta: TtaChoice = False) -> Assessment:
        """For a B×C×H×W batch: ``softmax(logits / T)`` (``T`` the model file's temperature, 1 without
        one), with ``tta`` the mean over that view set's views (:meth:`resolve_tta`); the scope
        scores; and the same probabilities at ``T = 1``."""
        logits, scores = self._view_logits(batch, tta_views(self.resolve_tta(tta)))
        temperature = self.info.temperature
        return Assessment(torch.softmax(logits / temperature, 2).mean(0).numpy(), scores,
                          torch.softmax(logits, 2).mean(0).numpy())

    def probabilities(self, batch: torch.Tensor, tta: TtaChoice = False) -> np.ndarray:
        """B×K calibrated probabilities (:meth:`assess`)."""
        return self.assess(batch, tta).probs

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self.preprocessing)

    def prepare_file(self, path: Path, view: str | None = None) -> torch.Tensor:
        """One image file as a model input; ``view`` (a dihedral name, for splits drawn after offline
        augmentation) is applied to the image before pre-processing, as that augmentation was."""
        image = load_image(path)
        return self.preprocess(image if view is None else apply_view(image, view))

    def card(self) -> dict[str, Any]:
        """The model card: the file's metadata (file names, not this machine's folders) plus the file's
        name and SHA-256 and which back-end runs it."""
        return {
            **self.info.public_metadata(),
            "tta": self.tta_card(),
            "source": {"file": self.source.name, "sha256": file_sha256(self.source), "backend": self.backend,
                       "explainable": self.can_explain},
        }


class TorchPredictor(Predictor):
    """A breastvision model file (safetensors), run by PyTorch; also the one Grad-CAM can explain.
    ``model``: the network already built from ``bundle`` (the training engine's, in memory)."""

    backend = "pytorch"
    can_explain = True

    def __init__(self, bundle: ModelBundle, source: Path, device: torch.device | str = "cpu",
                 model: torch.nn.Module | None = None) -> None:
        self.info = bundle
        self.source = source
        self.device = torch.device(device)
        self.model = (bundle.build_model() if model is None else model.eval()).to(self.device)
        self._tap = None
        if bundle.scope is not None:
            from breastvision.models.scope import FeatureTap

            self._tap = FeatureTap(self.model, bundle.scope.layer_names)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        # inference_mode, not a flag on the model: the model stays shareable between threads.
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def scored(self, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        if self._tap is None:
            return self.logits(batch), None
        logits, features = self._tap.features(batch.to(self.device))
        return logits.float().cpu(), self.info.scope.score(features)


class OnnxPredictor(Predictor):
    """An ONNX export of a model file, run by onnxruntime: on a GPU (CUDAExecutionProvider) when the
    device is CUDA, which needs the onnxruntime-gpu build, else on the CPU. An export with a
    ``scope_score`` output and the scope's metadata flags as the model file does; its ``info.scope``
    holds the threshold and the layers' sizes and standardisation, the statistics being in the graph."""

    backend = "onnxruntime"

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(str(path), options, providers=_providers(device))
        except (ort_errors.Fail, ort_errors.InvalidProtobuf, ort_errors.InvalidGraph,
                ort_errors.NoSuchFile, ort_errors.NotImplemented, ort_errors.InvalidArgument) as err:
            raise BreastvisionError(f"{path} is not a usable ONNX model: {one_line(err)}") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
        if raw is None:
            raise BreastvisionError(
                f"{path} has no breastvision metadata; export it with 'breastvision export'"
            )
        self.info = ModelBundle.from_metadata(raw, state_dict={}, source=path)
        scope = self.session.get_modelmeta().custom_metadata_map.get(SCOPE_METADATA_KEY)
        if scope is not None:
            self.info.scope = scope_description(scope, path)
        self.source = path
        self.input_name = self.session.get_inputs()[0].name
        self._check_shapes()
        self._outputs = [o.name for o in self.session.get_outputs()][:2 if scope is not None else 1]

    def _check_shapes(self) -> None:
        """The graph must take B×3×S×S and give B×K for this file's S and K (static sizes only),
        and a B scope score where the metadata has a scope (an output older readers pass over)."""
        size, k = self.preprocessing.input_size, len(self.class_names)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        problems = []
        if len(inputs) != 1 or not _shape_fits(inputs[0].shape, [None, 3, size, size]):
            problems.append(f"inputs {[i.shape for i in inputs]}, expected one [batch, 3, {size}, {size}]")
        if not outputs or not _shape_fits(outputs[0].shape, [None, k]):
            problems.append(f"output {outputs[0].shape if outputs else None}, expected [batch, {k}] "
                            f"for its {k} class names")
        scored = len(outputs) > 1 and outputs[1].name == SCOPE_OUTPUT
        if self.info.scope is not None and not (scored and _shape_fits(outputs[1].shape, [None])):
            problems.append(f"its scope metadata needs a second output {SCOPE_OUTPUT} of shape [batch], "
                            f"not {[(o.name, o.shape) for o in outputs[1:]]}")
        elif self.info.scope is None and scored:
            problems.append(f"output {SCOPE_OUTPUT} without the scope metadata ({SCOPE_METADATA_KEY})")
        if problems:
            raise BreastvisionError(f"{self.source} does not match its own metadata: {'; '.join(problems)}")

    def _run(self, batch: torch.Tensor, outputs: list[str]) -> list[np.ndarray]:
        # TTA views can be strided (transposes); onnxruntime is given a packed float32 copy.
        return self.session.run(outputs, {self.input_name: np.ascontiguousarray(batch.numpy(), np.float32)})

    def scored(self, batch: torch.Tensor) -> tuple[torch.Tensor, np.ndarray | None]:
        """The graph's log-probabilities (as :meth:`logits`) and its scope scores (``None`` without
        a scope), from one run."""
        probs, *scores = self._run(batch, self._outputs)
        return torch.from_numpy(probs).log(), (np.asarray(scores[0], np.float64) if scores else None)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Log-probabilities: the graph ends in a softmax, and the temperature is applied here."""
        return torch.from_numpy(self._run(batch, self._outputs[:1])[0]).log()


def _shape_fits(shape: Sequence[Any], expected: Sequence[int | None]) -> bool:
    """Whether an onnxruntime shape (ints, or names for dynamic axes) can be ``expected``
    (``None``: any size)."""
    pairs = zip(shape, expected, strict=False)
    return len(shape) == len(expected) and all(
        want is None or not isinstance(got, int) or got == want for got, want in pairs
    )


def _providers(device: torch.device | str) -> list[str]:
    """onnxruntime's providers for ``device``: CUDA first only for a CUDA device, and only if this
    onnxruntime build has it (a CPU-only build asked for CUDA is a one-line error)."""
    import onnxruntime as ort

    if torch.device(device).type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BreastvisionError(f"--device {device}: this onnxruntime has no CUDAExecutionProvider "
                                "(install onnxruntime-gpu, or use the .safetensors model file)")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def load_predictor(path: str | os.PathLike, device: str = "cpu",
                   operating_point: str | None = None) -> Predictor:
    """A predictor for a ``.onnx`` export or a breastvision model file (anything else), on ``device``
    (``devices.resolve_device``'s names: ``auto``, ``cpu``, ``cuda[:N]``), its decisions following
    the stored ``operating_point`` (``None``: argmax)."""
    from breastvision.devices import resolve_device

    torch_device = resolve_device(device)
    path = check_model_path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, torch_device).use_operating_point(operating_point)
    return TorchPredictor(ModelBundle.load(path), path, torch_device).use_operating_point(operating_point)


@dataclass
class Prediction:
    name: str
    path: Path
    probabilities: dict[str, float]
    #: The most probable class.
    predicted: str
    #: The class the decision rule gives (:class:`Judge`): ``predicted`` unless an operating point is chosen.
    decision: str = ""
    overlays: dict[str, Path] = field(default_factory=dict)
    #: Operating point name -> whether P(positive class) >= its threshold (empty without them).
    decisions: dict[str, bool] = field(default_factory=dict)
    #: The model file's scope score and whether it exceeds the threshold (``None``: no scope).
    scope_score: float | None = None
    out_of_scope: bool | None = None
    #: Where labels are known (``evaluate``, training): the true class name, the image's group and
    #: its subtype (``Record.subtype``; ``None``: the data names none).
    true_label: str | None = None
    group: str | None = None
    subtype: str | None = None


@dataclass
class PredictionRun:
    """Everything ``predict`` produced: the predictions, what was skipped and which model ran."""

    predictions: list[Prediction]
    skipped: list[Skipped]
    masks_ignored: int
    class_names: list[str]
    model: dict[str, Any]
    #: The test-time augmentation view set averaged (``None``: none).
    tta: str | None
    #: The model file's operating points (``ModelBundle.operating_points``), ``None`` without them.
    operating_points: dict[str, Any] | None = None
    #: What ``decision`` follows: ``argmax`` or a stored operating point's name.
    decision_rule: str = ARGMAX
    #: The weight of each folder's mean in its images' probabilities (``evaluation.context``; 0: none).
    patient_context: float = 0.0


def decision_columns(operating_points: dict[str, Any] | None) -> dict[str, str]:
    """Operating point name -> its CSV column, ``<positive>_at_<name>`` (``malignant_at_youden``)."""
    if not operating_points:
        return {}
    positive = operating_points["positive_class"]
    return {name: f"{positive}_at_{name}" for name in operating_points["thresholds"]}


def decide(probabilities: dict[str, float], operating_points: dict[str, Any] | None) -> dict[str, bool]:
    """Whether each stored operating point calls this image positive: ``P(positive) >= threshold``."""
    if not operating_points:
        return {}
    score = probabilities[operating_points["positive_class"]]
    return {name: bool(score >= t) for name, t in operating_points["thresholds"].items()}


@dataclass
class Scored:
    """:func:`score_items`' answer: per item that could be prepared, in order, the calibrated
    probabilities, the scope scores (``None`` without a scope) and the probabilities at ``T = 1``;
    and the reason for each item that could not, by its index."""

    probs: np.ndarray
    scores: np.ndarray | None
    uncalibrated: np.ndarray
    failures: dict[int, str]


class _Inputs(torch.utils.data.Dataset):
    """``(path, view)`` items → ``(index, tensor)`` by ``render``, or ``(index, reason)`` for one
    that cannot be decoded or prepared: a bad file is a listed skip, not the end of the run."""

    def __init__(self, items: Sequence[tuple[Path, str | None]],
                 render: Callable[[Path, str | None], torch.Tensor]) -> None:
        self.items, self.render = list(items), render

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        path, view = self.items[index]
        try:
            return index, self.render(path, view)
        except BreastvisionError as err:
            # BadImageError already names the file; other errors (stain fitting) may not.
            return index, str(err).removeprefix(f"{path}: ")


def _collate(samples: list[tuple[int, torch.Tensor | str]]) -> tuple[torch.Tensor | None, dict[int, str]]:
    tensors = [item for _, item in samples if isinstance(item, torch.Tensor)]
    failed = {index: item for index, item in samples if isinstance(item, str)}
    return (torch.stack(tensors) if tensors else None), failed


def score_items(
    predictor: Predictor,
    items: Sequence[tuple[Path, str | None]],
    *,
    tta: TtaChoice = False,
    batch_size: int = 8,
    workers: int = 0,
    render: Callable[[Path, str | None], torch.Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Scored:
    """:meth:`Predictor.assess` over ``(path, view)`` items (``view``: ``None``, or a dihedral view
    applied before pre-processing), batched, read by ``workers`` loader processes; ``render``
    replaces :meth:`Predictor.prepare_file` (the training engine's augmented views). ``on_batch`` is
    told how many items each finished batch held."""
    loader = torch.utils.data.DataLoader(
        _Inputs(items, render or predictor.prepare_file), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate,
    )
    parts: list[Assessment] = []
    failures: dict[int, str] = {}
    for batch, failed in loader:
        failures.update(failed)
        if batch is not None:
            parts.append(predictor.assess(batch, tta=tta))
        if on_batch:
            on_batch(len(failed) + (0 if batch is None else len(batch)))
    k = len(predictor.class_names)
    joined = [np.concatenate([getattr(a, f) for a in parts]) if parts else np.zeros((0, k), np.float32)
              for f in ("probs", "uncalibrated")]
    scores = np.concatenate([a.scores for a in parts]) if parts and parts[0].scores is not None else None
    return Scored(joined[0], scores, joined[1], failures)


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last may be shorter), drawn lazily: only one batch is held."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _overlay_stem(name: str, used: set[str]) -> str:
    """A file name for an image's overlays: its path below the folder given, or, for a file given
    by absolute path, its own stem (a repeat gets ``-2``, ``-3`` …)."""
    path, frame = dicom.split_frame(name)
    stem = path.stem if path.is_absolute() else path.with_suffix("").as_posix().replace("/", "__")
    stem += f"_frame{frame}" if frame is not None else ""
    unique, n = stem, 1
    while unique in used:
        n += 1
        unique = f"{stem}-{n}"
    used.add(unique)
    return unique


def predict_paths(
    predictor: Predictor,
    inputs: Iterable[str | os.PathLike],
    *,
    tta: TtaChoice = False,
    batch_size: int = 8,
    frame: int | None = None,
    explain_dir: Path | None = None,
    explain_method: str = "gradcam",
    target_layers: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
    patient_context: float = 0.0,
) -> PredictionRun:
    """Predict every image under ``inputs``; with ``explain_dir``, save Grad-CAM overlays there.

    Heat-maps explain the predicted class (after TTA when it is on; ``tta``: :data:`TtaChoice`,
    the run records the set's name). ``frame`` picks one frame of
    multi-frame DICOM files (None: all). ``on_batch`` is told how many images each finished batch
    held, for progress bars. ``patient_context`` blends each image's probabilities with the mean of
    the images in its folder, one folder per patient (``evaluation.context``).
    """
    from breastvision.evaluation.context import check_weight, with_patient_context

    if explain_dir is not None and not predictor.can_explain:
        raise BreastvisionError("--explain needs the .safetensors model file (Grad-CAM needs PyTorch)")
    check_weight(patient_context)
    found = discover_images(inputs, frame)
    tta = predictor.resolve_tta(tta)
    scored = score_items(predictor, [(path, None) for path, _ in found.images], tta=tta,
                         batch_size=batch_size, on_batch=on_batch)
    skipped = [*found.skipped, *(Skipped(found.images[i][0], r) for i, r in sorted(scored.failures.items()))]
    judge, predictions, used_stems = predictor.judge, [], set()
    kept = [image for i, image in enumerate(found.images) if i not in scored.failures]
    probs = with_patient_context(scored.probs, [str(path.parent) for path, _ in kept], patient_context)
    for i, (path, name) in enumerate(kept):
        prediction = judge(name, path, probs[i], None if scored.scores is None else scored.scores[i])
        if explain_dir is not None:
            image = load_image(path)
            target = predictor.class_names.index(prediction.predicted)
            prediction.overlays = _explain_one(
                predictor, image, predictor.preprocess(image), target, explain_dir,
                _overlay_stem(name, used_stems), explain_method, target_layers,
            )
        predictions.append(prediction)
    model = {"architecture": predictor.info.architecture, "file": str(predictor.source),
             "backend": predictor.backend}
    return PredictionRun(predictions, skipped, found.masks, predictor.class_names, model, tta,
                         predictor.info.operating_points, judge.rule, patient_context)


def _explain_one(
    predictor: Predictor, image: Image.Image, tensor: torch.Tensor, target: int, out_dir: Path,
    stem: str, method: str, target_layers: Sequence[str] | None,
) -> dict[str, Path]:
    from breastvision.explanation.gradcam import explain, save_overlays

    explanation = explain(
        predictor.model, tensor, architecture=predictor.info.architecture, target=target,
        target_layers=target_layers, method=method,
    )
    return save_overlays(image, explanation, predictor.preprocessing, out_dir, stem)


def write_results(run: PredictionRun, out: Path) -> Path:
    """CSV (:func:`write_predictions_csv`) or JSON, by ``out``'s suffix."""
    suffix = out.suffix.lower()
    if suffix not in {".csv", ".json"}:
        raise BreastvisionError(f"--out must end in .csv or .json, not '{out.suffix or out.name}'")
    if suffix == ".csv":
        return write_predictions_csv(out, run.predictions, run.class_names, run.operating_points, run.skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "model": run.model,
        "tta": run.tta,
        "tta_views": list(tta_views(run.tta)),
        "class_names": run.class_names,
        "decision_rule": run.decision_rule,
        "patient_context": run.patient_context,
        **({"operating_points": run.operating_points} if run.operating_points else {}),
        "predictions": [
            {"path": printable(p.name), "predicted": p.predicted, "decision": p.decision,
             "probabilities": p.probabilities,
             **({"decisions": p.decisions} if p.decisions else {}),
             **({"out_of_scope": p.out_of_scope, "scope_score": p.scope_score}
                if p.scope_score is not None else {}),
             **({"overlays": {k: printable(v) for k, v in p.overlays.items()}} if p.overlays else {})}
            for p in run.predictions
        ],
        "skipped": [{"path": printable(s.path), "reason": printable(s.reason)} for s in run.skipped],
        "masks_ignored": run.masks_ignored,
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    return out


def write_predictions_csv(
    out: str | os.PathLike, predictions: Sequence[Prediction], class_names: Sequence[str],
    operating_points: dict[str, Any] | None = None, skipped: Sequence[Skipped] = (),
) -> Path:
    """The one per-image predictions table (module docstring, "One table"): a row per prediction,
    then the skipped files with their reason."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled = any(p.true_label is not None for p in predictions)
    columns = decision_columns(operating_points)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        truth_columns = ["true_label", "group", "subtype"] if labelled else []
        writer.writerow(["path", *truth_columns, "predicted", "decision", *(f"p_{c}" for c in class_names),
                         *columns.values(), "out_of_scope", "scope_score", "skipped"])
        for p in predictions:
            known = [p.true_label or "", printable(p.group or ""), printable(p.subtype or "")]
            truth = known if labelled else []
            probabilities = (f"{p.probabilities[c]:.6f}" for c in class_names)
            decisions = (p.decisions[k] for k in columns)
            scope = ["", ""] if p.scope_score is None else [p.out_of_scope, f"{p.scope_score:.4f}"]
            writer.writerow([printable(p.name), *truth, p.predicted, p.decision, *probabilities, *decisions,
                             *scope, ""])
        # Blank cells for the truth, predicted, decision, probability, decision and scope columns.
        blank = [""] * (len(truth_columns) + 2 + len(class_names) + len(columns) + 2)
        for s in skipped:
            writer.writerow([printable(s.path), *blank, printable(s.reason)])
    return out
