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
- **Test-time augmentation** averages the softmax probabilities over the 8 dihedral views
  (``data.transforms.dihedral_tta``), the group of 90° rotations and flips under which a
  histopathology or ultrasound field keeps its class; averaging probabilities rather than logits
  keeps every view's vote bounded.
- **ONNX** exports (``serving.export``) end in a softmax, so onnxruntime returns probabilities.
- **Calibration.** Probabilities are ``softmax(logits / T)`` with the model file's fitted temperature
  ``T`` (1 for files without one), in :meth:`Predictor.probabilities`, the one place every consumer
  (predict, web, the Python API, slides) goes through. The ONNX graph stays uncalibrated; its
  predictor applies ``T`` from the metadata the export carries, to the graph's log-probabilities.
- **Decisions.** A model file with operating points (malignant-vs-rest thresholds chosen on
  validation) adds, per image, whether ``P(malignant) >= threshold`` at each of them.
- **Scope.** A model file with a fitted scope (``models.scope``) adds, per image, ``scope_score``
  (the smallest Mahalanobis distance of its pooled features to a training class mean) and
  ``out_of_scope`` (score above the stored threshold): an image so flagged is "outside this model's
  scope" and its label should not be trusted. The score is of the image as given (identity view),
  also under TTA. A file without a scope, and an ONNX export (which carries no features: the flag
  needs the .safetensors model file), leave both CSV cells blank, so the CSV has one shape.
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
from typing import Any

import numpy as np
import torch
from PIL import Image

from breastvision.data import dicom
from breastvision.data.io import BadImageError, file_problem, is_image_file, load_image
from breastvision.data.readers._common import walk_files
from breastvision.data.records import Skipped
from breastvision.data.transforms import dihedral_tta, preprocess_image
from breastvision.errors import BreastvisionError, one_line
from breastvision.models.bundle import ModelBundle, Preprocessing, check_model_path
from breastvision.paths import file_sha256, printable

log = logging.getLogger(__name__)

#: Lesion masks in the BUSI layout (``benign (3)_mask.png``, ``benign (3)_mask_1.png``).
MASK_PATTERN = "*_mask*"
#: Key of the model metadata in an ONNX file's ``metadata_props``, as in the model file.
ONNX_METADATA_KEY = "breastvision"


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


class Predictor(ABC):
    """A model ready to turn pre-processed batches into class probabilities."""

    #: The model file's metadata; for ONNX, a bundle without weights.
    info: ModelBundle
    source: Path
    backend: str
    can_explain = False

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def preprocessing(self) -> Preprocessing:
        return self.info.preprocessing

    @abstractmethod
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """B×K float32 logits (or log-probabilities: the softmax treats them alike) for one
        B×C×H×W batch, before calibration."""

    def probabilities(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        """B×K probabilities ``softmax(logits / T)`` for a B×C×H×W batch, ``T`` the model file's
        temperature (1 without one); with ``tta``, the mean over the 8 dihedral views."""
        temperature = self.info.temperature

        def scaled(view: torch.Tensor) -> torch.Tensor:
            return self.logits(view) / temperature

        if not tta:
            return torch.softmax(scaled(batch), dim=1).numpy()
        return dihedral_tta(scaled, batch).numpy()  # it soft-maxes each view's scaled logits

    def assess(self, batch: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """``probabilities`` and, for a model file with a scope, each image's scope score (else None)."""
        return self.probabilities(batch, tta), None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self.preprocessing)

    def card(self) -> dict[str, Any]:
        """The model card: the file's metadata (file names, not this machine's folders) plus the file's
        name and SHA-256 and which back-end runs it."""
        return {
            **self.info.public_metadata(),
            "source": {"file": self.source.name, "sha256": file_sha256(self.source), "backend": self.backend,
                       "explainable": self.can_explain},
        }


class TorchPredictor(Predictor):
    """A breastvision model file (safetensors), run by PyTorch; also the one Grad-CAM can explain."""

    backend = "pytorch"
    can_explain = True

    def __init__(self, bundle: ModelBundle, source: Path, device: torch.device | str = "cpu") -> None:
        self.info = bundle
        self.source = source
        self.device = torch.device(device)
        self.model = bundle.build_model().to(self.device)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        # inference_mode, not a flag on the model: the model stays shareable between threads.
        with torch.inference_mode():
            return self.model(batch.to(self.device)).float().cpu()

    def assess(self, batch: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        scope = self.info.scope
        if scope is None:
            return super().assess(batch, tta)
        from breastvision.models.scope import pooled_features

        logits, features = pooled_features(self.model, batch.to(self.device))  # one pass gives both
        logits, features = logits.cpu(), features.cpu()
        probs = self.probabilities(batch, tta) if tta else torch.softmax(logits / self.info.temperature, 1)
        return np.asarray(probs), scope.score(features)


class OnnxPredictor(Predictor):
    """An ONNX export of a model file, run by onnxruntime: on a GPU (CUDAExecutionProvider) when the
    device is CUDA, which needs the onnxruntime-gpu build, else on the CPU."""

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
        self.source = path
        self.input_name = self.session.get_inputs()[0].name
        self._check_shapes()

    def _check_shapes(self) -> None:
        """The graph must take B×3×S×S and give B×K for this file's S and K (static sizes only)."""
        size, k = self.preprocessing.input_size, len(self.class_names)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        problems = []
        if len(inputs) != 1 or not _shape_fits(inputs[0].shape, [None, 3, size, size]):
            problems.append(f"inputs {[i.shape for i in inputs]}, expected one [batch, 3, {size}, {size}]")
        if not outputs or not _shape_fits(outputs[0].shape, [None, k]):
            problems.append(f"output {outputs[0].shape if outputs else None}, expected [batch, {k}] "
                            f"for its {k} class names")
        if problems:
            raise BreastvisionError(f"{self.source} does not match its own metadata: {'; '.join(problems)}")

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """Log-probabilities: the graph ends in a softmax, and the temperature is applied here."""
        # TTA views can be strided (transposes); onnxruntime is given a packed float32 copy.
        probs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch.numpy(), np.float32)})[0]
        return torch.from_numpy(probs).log()


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


def load_predictor(path: str | os.PathLike, device: str = "cpu") -> Predictor:
    """A predictor for a ``.onnx`` export or a breastvision model file (anything else), on ``device``
    (``devices.resolve_device``'s names: ``auto``, ``cpu``, ``cuda[:N]``)."""
    from breastvision.devices import resolve_device

    torch_device = resolve_device(device)
    path = check_model_path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, torch_device)
    return TorchPredictor(ModelBundle.load(path), path, torch_device)


@dataclass
class Prediction:
    name: str
    path: Path
    probabilities: dict[str, float]
    predicted: str
    overlays: dict[str, Path] = field(default_factory=dict)
    #: Operating point name -> whether P(positive class) >= its threshold (empty without them).
    decisions: dict[str, bool] = field(default_factory=dict)
    #: The model file's scope score and whether it exceeds the threshold (``None``: no scope).
    scope_score: float | None = None
    out_of_scope: bool | None = None


@dataclass
class PredictionRun:
    """Everything ``predict`` produced: the predictions, what was skipped and which model ran."""

    predictions: list[Prediction]
    skipped: list[Skipped]
    masks_ignored: int
    class_names: list[str]
    model: dict[str, Any]
    tta: bool
    #: The model file's operating points (``ModelBundle.operating_points``), ``None`` without them.
    operating_points: dict[str, Any] | None = None

    def decision_columns(self) -> dict[str, str]:
        """Operating point name -> its CSV column, ``<positive>_at_<name>`` (``malignant_at_youden``)."""
        if not self.operating_points:
            return {}
        positive = self.operating_points["positive_class"]
        return {name: f"{positive}_at_{name}" for name in self.operating_points["thresholds"]}


def decide(probabilities: dict[str, float], operating_points: dict[str, Any] | None) -> dict[str, bool]:
    """Whether each stored operating point calls this image positive: ``P(positive) >= threshold``."""
    if not operating_points:
        return {}
    score = probabilities[operating_points["positive_class"]]
    return {name: bool(score >= t) for name, t in operating_points["thresholds"].items()}


def _prepared(
    predictor: Predictor, images: Sequence[tuple[Path, str]], skipped: list[Skipped]
) -> Iterator[tuple[Path, str, Image.Image, torch.Tensor]]:
    for path, name in images:
        try:
            image = load_image(path)
            tensor = predictor.preprocess(image)
        except BreastvisionError as err:
            # BadImageError already names the file; other errors (stain fitting) may not.
            skipped.append(Skipped(path, str(err).removeprefix(f"{path}: ")))
            continue
        yield path, name, image, tensor


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
    tta: bool = False,
    batch_size: int = 8,
    frame: int | None = None,
    explain_dir: Path | None = None,
    explain_method: str = "gradcam",
    target_layers: Sequence[str] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PredictionRun:
    """Predict every image under ``inputs``; with ``explain_dir``, save Grad-CAM overlays there.

    Heat-maps explain the predicted class (after TTA when it is on). ``frame`` picks one frame of
    multi-frame DICOM files (None: all). ``on_batch`` is told how many images each finished batch
    held, for progress bars.
    """
    if explain_dir is not None and not predictor.can_explain:
        raise BreastvisionError("--explain needs the .safetensors model file (Grad-CAM needs PyTorch)")
    found = discover_images(inputs, frame)
    skipped = list(found.skipped)
    predictions: list[Prediction] = []
    used_stems: set[str] = set()
    for batch in batched(_prepared(predictor, found.images, skipped), batch_size):
        probs, scores = predictor.assess(torch.stack([tensor for *_, tensor in batch]), tta=tta)
        for i, ((path, name, image, tensor), row) in enumerate(zip(batch, probs, strict=True)):
            best = int(np.argmax(row))
            probabilities = dict(zip(predictor.class_names, map(float, row), strict=True))
            prediction = Prediction(name, path, probabilities, predictor.class_names[best],
                                    decisions=decide(probabilities, predictor.info.operating_points))
            if scores is not None:
                prediction.scope_score = float(scores[i])
                prediction.out_of_scope = predictor.info.scope.outside(scores[i])
            if explain_dir is not None:
                prediction.overlays = _explain_one(
                    predictor, image, tensor, best, explain_dir, _overlay_stem(name, used_stems),
                    explain_method, target_layers,
                )
            predictions.append(prediction)
        if on_batch:
            on_batch(len(batch))
    model = {"architecture": predictor.info.architecture, "file": str(predictor.source),
             "backend": predictor.backend}
    return PredictionRun(predictions, skipped, found.masks, predictor.class_names, model, tta,
                         predictor.info.operating_points)


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
    """CSV (one row per image, skipped files last with their reason) or JSON, by ``out``'s suffix."""
    suffix = out.suffix.lower()
    if suffix not in {".csv", ".json"}:
        raise BreastvisionError(f"--out must end in .csv or .json, not '{out.suffix or out.name}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".json":
        document = {
            "model": run.model,
            "tta": run.tta,
            "class_names": run.class_names,
            **({"operating_points": run.operating_points} if run.operating_points else {}),
            "predictions": [
                {"path": printable(p.name), "predicted": p.predicted, "probabilities": p.probabilities,
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
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        columns = run.decision_columns()
        writer.writerow(["path", "predicted", *(f"p_{c}" for c in run.class_names), *columns.values(),
                         "out_of_scope", "scope_score", "skipped"])
        for p in run.predictions:
            probabilities = (f"{p.probabilities[c]:.6f}" for c in run.class_names)
            decisions = (p.decisions[k] for k in columns)
            scope = ["", ""] if p.scope_score is None else [p.out_of_scope, f"{p.scope_score:.4f}"]
            writer.writerow([printable(p.name), p.predicted, *probabilities, *decisions, *scope, ""])
        blank = [""] * (len(run.class_names) + len(columns) + 2)
        for s in run.skipped:
            writer.writerow([printable(s.path), "", *blank, printable(s.reason)])
    return out
