"""The model file: weights plus everything needed to use them, in one safetensors file.

A ``.safetensors`` file holds the state dict; its string metadata holds one JSON document with the
architecture and its arguments, class names, the exact pre-processing (input size, resize,
normalisation, the fitted stain normaliser), the weights' lineage (ImageNet → LC25000 → BreakHis,
each with its checkpoint and data) and the validation metrics shown on the model card. Safetensors
rather than a pickle so that opening a model file received from elsewhere cannot run code.

A model file is untrusted input: :meth:`ModelBundle.load` refuses anything that is not one (a run
folder, a training checkpoint, an empty, truncated or foreign file) and validates the metadata
(pydantic, as the training configs are) before anything is built from it, each with a one-line
error naming the file. Normalisation takes exactly three values per statistic, one per RGB
channel: a one-value ``mean`` is refused rather than broadcast, since no file written here has one.

**Test-time augmentation.** A file names the view set ``--tta`` averages (``tta``: ``dihedral8`` or
``hflip``), chosen when it was trained; files written before the field get the set of the modality
they record (``models.tta``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PureWindowsPath
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic import dataclasses as pydantic_dataclasses

from breastvision.errors import BreastvisionError, describe_validation_error, one_line
from breastvision.models.tta import TtaSet, recorded_modality, tta_for

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_VERSION = 1
_META_KEY = "breastvision"
#: Image sides a model file may ask for: below 16 pixels no network here keeps a feature map (some
#: need more, which ``build_model``'s trial forward pass reports); above 4096 one float image alone
#: is 200 MB, a typo rather than a model.
MIN_INPUT_SIZE, MAX_INPUT_SIZE = 16, 4096
#: The file name training writes into a run folder.
MODEL_FILE_NAME = "model.safetensors"
#: Pre-processing keys added after model files were first written: older files lack them, and
#: read as their defaults (``mpp``: unknown scale).
_ADDED_LATER = frozenset({"mpp"})
#: What ``torch.save`` files are usually called; a training run's are ``checkpoints/*.ckpt``.
_CHECKPOINT_SUFFIXES = {".ckpt", ".pt", ".pth"}



def _three_values(value: Any) -> Any:
    """Length first, so that a one-value ``mean`` reads as that, not as two missing items."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError("needs 3 values, one per RGB channel")
    return value


#: An image side in pixels (an integer: ``"224"`` or ``224.0`` in a file is refused, not coerced).
ImageSide = Annotated[StrictInt, Field(ge=MIN_INPUT_SIZE, le=MAX_INPUT_SIZE)]
_Finite = Annotated[float, Field(allow_inf_nan=False)]
_Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: Per-channel normalisation statistics, one value per RGB channel.
ChannelMeans = Annotated[tuple[_Finite, _Finite, _Finite], BeforeValidator(_three_values)]
ChannelStds = Annotated[tuple[_Positive, _Positive, _Positive], BeforeValidator(_three_values)]


def _validated(model: Any, raw: Any, what: str) -> Any:
    """``model`` (a pydantic type) validated from ``raw``, else a one-line ``BreastvisionError``."""
    try:
        return TypeAdapter(model).validate_python(raw)
    except ValidationError as err:
        raise BreastvisionError(f"{what}: {describe_validation_error(err)}") from None


@pydantic_dataclasses.dataclass(config=ConfigDict(extra="forbid"))
class Preprocessing:
    """How an image becomes the model's input tensor, at prediction time.

    ``resize`` is the side the image is resized to before a centre crop of ``input_size``
    (``None``: resize straight to ``input_size``). ``stain`` is a fitted stain normaliser's state
    (``{"method": "macenko", ...}``) or ``None``. ``mpp`` is the physical scale the model was
    trained at: micrometres per pixel (x, y) of its input tensor, after the resize (``None``:
    unknown, as in model files written before the field); whole-slide prediction tiles slides so
    that a tile reaches the model at this scale. Validated on construction (pydantic).
    """

    input_size: ImageSide = 224
    resize: ImageSide | None = None
    mean: ChannelMeans = IMAGENET_MEAN
    std: ChannelStds = IMAGENET_STD
    stain: dict[str, Any] | None = None
    mpp: tuple[_Positive, _Positive] | None = None

    @field_validator("stain")
    @classmethod
    def _usable_stain(cls, state: dict[str, Any] | None) -> dict[str, Any] | None:
        if state is not None:
            from breastvision.data.stain import make_normalizer

            try:
                make_normalizer(state)
            except BreastvisionError as err:
                raise ValueError(str(err)) from None
        return state

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocessing:
        if self.resize is not None and self.resize < self.input_size:
            raise ValueError(f"resize {self.resize} is smaller than the input size {self.input_size}")
        return self

    @classmethod
    def parse(cls, raw: Any, what: str = "pre-processing") -> Preprocessing:
        """Validated from a mapping (a file's, a caller's), or a one-line ``BreastvisionError``."""
        return _validated(cls, raw, what)


class Calibration(BaseModel):
    """Temperature scaling fitted after training (``evaluation.calibration.TemperatureScaler``):
    predictions are ``softmax(logits / temperature)``."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["temperature scaling"] = "temperature scaling"
    temperature: _Positive
    fitted_on: StrictStr = "validation"
    n_images: StrictInt | None = None
    nll_before: _Finite | None = None
    nll_after: _Finite | None = None


_Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class OperatingPoints(BaseModel):
    """Malignant-vs-rest thresholds chosen on calibrated validation probabilities
    (``evaluation.operating_points.choose_operating_points``)."""

    model_config = ConfigDict(extra="forbid")

    positive_class: StrictStr
    rule: StrictStr = ""
    target_sensitivity: Annotated[float, Field(gt=0, le=1)]
    thresholds: dict[StrictStr, _Probability] = Field(min_length=1)
    validation: dict[str, dict[str, _Probability | None]] = Field(default_factory=dict)
    n_validation: StrictInt | None = None


class ScopeLayer(BaseModel):
    """One layer of a scope: its name, sizes and the standardisation of its distances."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(min_length=1)
    feature_dim: Annotated[StrictInt, Field(ge=1)]
    n_classes: Annotated[StrictInt, Field(ge=1)]
    centre: Annotated[float, Field(allow_inf_nan=False)]
    spread: Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ScopeMetadata(BaseModel):
    """How far from the training images an input may be before it is flagged (``models.scope``);
    the class means and the precision matrices are the file's ``scope.*`` tensors. ``layers`` is
    absent in files from before per-layer statistics, which give ``feature_dim`` and ``n_classes``
    of their one penultimate layer instead."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["mahalanobis"] = "mahalanobis"
    #: A standardised sum can be negative; older files' plain distances never are.
    threshold: Annotated[float, Field(allow_inf_nan=False)]
    fitted_on: StrictStr = "train"
    threshold_from: StrictStr = ""
    n_images: StrictInt = 0
    n_validation: StrictInt | None = None
    layers: list[ScopeLayer] | None = Field(default=None, min_length=1)
    feature_dim: Annotated[StrictInt, Field(ge=1)] | None = None
    n_classes: Annotated[StrictInt, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _one_layout(self) -> ScopeMetadata:
        single = self.feature_dim is not None and self.n_classes is not None
        if (self.layers is None) == (not single):
            raise ValueError("scope gives either layers or feature_dim and n_classes (older files)")
        if self.layers is None and self.threshold < 0:
            raise ValueError("scope.threshold of a one-layer distance must be >= 0")
        names = [layer.name for layer in self.layers or []]
        if len(set(names)) != len(names):
            raise ValueError("scope layers repeat")
        return self


def scope_description(raw: str, source: str | Path) -> Any:
    """A ``models.scope.Scope`` from its metadata alone (JSON text; an ONNX export's, whose graph
    holds the statistics), validated as a model file's: a one-line ``BreastvisionError`` naming
    ``source`` if it is not one. Its layers hold shape-only tensors (``Scope.from_file``)."""
    from breastvision.models.scope import Scope

    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise BreastvisionError(f"{source}: the scope metadata is not JSON ({err})") from None
    valid = _validated(ScopeMetadata, meta, f"{source}: bad scope metadata")
    return Scope.from_file(valid.model_dump(), None, str(source))


def _unique(names: list[str]) -> list[str]:
    if any(not name.strip() for name in names):
        raise ValueError("class names must not be empty")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class names repeat: {', '.join(repeated)}")
    return names


class ModelMetadata(BaseModel):
    """The JSON document of a model file (and of its ONNX export), as validated on load."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())  # a field is model_kwargs

    format_version: Literal[1]
    architecture: StrictStr = Field(min_length=1)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: A classifier needs two classes; the softmax of one is always 1.
    class_names: list[StrictStr] = Field(min_length=2)
    preprocessing: Preprocessing
    lineage: list[dict[str, Any]] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    #: Added later, so optional: files written before them predict uncalibrated, without thresholds.
    calibration: Calibration | None = None
    operating_points: OperatingPoints | None = None
    #: An ensemble's members (``models.ensemble``); absent in single-model files.
    ensemble: Ensemble | None = None
    scope: ScopeMetadata | None = None
    #: The view set ``--tta`` averages (``models.tta``); absent in older files.
    tta: TtaSet | None = None

    _distinct = field_validator("class_names")(_unique)

    @model_validator(mode="after")
    def _known_positive(self) -> ModelMetadata:
        if self.operating_points and self.operating_points.positive_class not in self.class_names:
            raise ValueError(f"operating_points.positive_class {self.operating_points.positive_class!r} "
                             f"is not one of the class names {self.class_names}")
        if (self.ensemble is not None) != (self.architecture == "ensemble"):
            raise ValueError("architecture 'ensemble' goes with an 'ensemble' entry, and only it")
        if self.ensemble and any(m.class_names != self.class_names for m in self.ensemble.members):
            raise ValueError("ensemble members' class names differ from the file's")
        return self

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _complete(cls, value: Any) -> Any:
        """Every key spelled out, as ``save`` writes them: a missing ``mean`` must not quietly
        become ImageNet's."""
        if isinstance(value, dict):
            missing = [f.name for f in fields(Preprocessing)
                       if f.name not in value and f.name not in _ADDED_LATER]
            if missing:
                raise ValueError(f"lacks {', '.join(missing)}")
        return value


class Ensemble(BaseModel):
    """An ensemble file's members, each a model file's metadata (``models.ensemble``)."""

    model_config = ConfigDict(extra="forbid")

    members: list[ModelMetadata] = Field(min_length=2)
    combine: Literal["mean of calibrated probabilities"]


ModelMetadata.model_rebuild()


@dataclass
class ModelBundle:
    architecture: str
    class_names: list[str]
    state_dict: dict[str, torch.Tensor]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    #: Oldest first: ``{"stage": ..., "weights": ..., "data": ..., "checkpoint": ..., "split": ...}``.
    lineage: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``Calibration`` and ``OperatingPoints`` as dicts (``None``: not fitted, as in older files).
    calibration: dict[str, Any] | None = None
    operating_points: dict[str, Any] | None = None
    #: ``Ensemble`` as a dict for an ensemble file (``models.ensemble``), else ``None``.
    ensemble: dict[str, Any] | None = None
    #: ``models.scope.Scope`` (``None``: not fitted, as in older files); its tensors are saved beside
    #: the weights under ``scope.*`` and are not part of ``state_dict``.
    scope: Any = None
    #: The test-time augmentation view set the file records (``None``: an older file, :attr:`default_tta`).
    tta: str | None = None
    #: The file this bundle was read from (named in errors); not part of the metadata.
    source: Path | None = field(default=None, repr=False, compare=False)

    def metadata(self) -> dict[str, Any]:
        """Everything but the weights, as a JSON-able dict (also written into ONNX exports)."""
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "model_kwargs": self.model_kwargs,
            "class_names": self.class_names,
            "preprocessing": self._preprocessing_metadata(),
            "lineage": self.lineage,
            "metrics": self.metrics,
            "extra": self.extra,
            # Written only when fitted, so a file without them stays readable by older releases.
            **{k: v for k, v in (("calibration", self.calibration),
                                 ("operating_points", self.operating_points),
                                 ("ensemble", self.ensemble), ("tta", self.tta)) if v is not None},
            **({"scope": self.scope.metadata()} if self.scope is not None else {}),
        }

    @property
    def temperature(self) -> float:
        """What logits are divided by before the softmax: the fitted temperature, else 1."""
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    @property
    def default_tta(self) -> str:
        """The view set ``--tta`` averages: the file's ``tta``, else that of the modality it records
        (``models.tta``)."""
        return self.tta or tta_for(recorded_modality(self.metadata()))

    @property
    def thresholds(self) -> dict[str, float]:
        """The stored operating points' thresholds by name (empty without them)."""
        return dict(self.operating_points["thresholds"]) if self.operating_points else {}

    def _preprocessing_metadata(self) -> dict[str, Any]:
        # A field added later is written only when set, so a file that does not use it stays
        # readable by the releases written before it.
        fields = asdict(self.preprocessing)
        return {k: v for k, v in fields.items() if k not in _ADDED_LATER or v is not None}

    def public_metadata(self) -> dict[str, Any]:
        """``metadata()`` with every absolute path cut to its file name (hashes stay): what a model
        card shows to others, without the folders of the machine that trained or serves it."""
        return _without_folders(self.metadata())

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        meta = self.metadata()
        _validated(ModelMetadata, meta, f"not writing {path}, its metadata would not load")
        path.parent.mkdir(parents=True, exist_ok=True)
        scope = self.scope.tensors() if self.scope is not None else {}
        tensors = {k: v.detach().cpu().contiguous() for k, v in {**self.state_dict, **scope}.items()}
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def from_metadata(
        cls, meta: Any, state_dict: dict[str, torch.Tensor], source: str | Path = "model file"
    ) -> ModelBundle:
        """A bundle from a metadata document (a dict, or its JSON text), validated: ``BreastvisionError``
        naming ``source`` and the offending keys if it is not a model file's metadata."""
        if isinstance(meta, str):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError as err:
                raise BreastvisionError(f"{source}: the breastvision metadata is not JSON ({err})") from None
        if not isinstance(meta, dict):
            raise BreastvisionError(f"{source}: the breastvision metadata is not a JSON object")
        if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise BreastvisionError(
                f"{source}: model file format version {meta['format_version']!r} is not the one this "
                f"breastvision reads ({FORMAT_VERSION})"
            )
        valid = _validated(ModelMetadata, meta, f"{source}: bad metadata")
        scope = None
        if valid.scope is not None:
            from breastvision.models.scope import SCOPE_PREFIX, Scope

            scope = Scope.from_file(valid.scope.model_dump(), state_dict, str(source))
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(SCOPE_PREFIX)}
        return cls(
            architecture=valid.architecture,
            class_names=list(valid.class_names),
            state_dict=state_dict,
            model_kwargs=valid.model_kwargs,
            preprocessing=valid.preprocessing,
            lineage=valid.lineage,
            metrics=valid.metrics,
            extra=valid.extra,
            calibration=valid.calibration.model_dump() if valid.calibration else None,
            operating_points=valid.operating_points.model_dump() if valid.operating_points else None,
            ensemble=meta["ensemble"] if valid.ensemble else None,  # validated, kept as written
            scope=scope,
            tta=valid.tta,
            source=Path(source) if isinstance(source, Path) else None,
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelBundle:
        """Read and validate a model file; every way it can be something else is a one-line error."""
        from safetensors import SafetensorError, safe_open

        path = check_model_path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get(_META_KEY)
                if raw is None:
                    raise BreastvisionError(f"{path} is a safetensors file without breastvision metadata")
                state_dict = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as err:
            raise BreastvisionError(_not_a_model_file(path, err)) from None
        return cls.from_metadata(raw, state_dict, path)

    def build_model(self) -> torch.nn.Module:
        """The architecture with these weights loaded, in eval mode."""
        from breastvision.models.registry import create_model
        from breastvision.models.weights import describe_mismatch

        if self.ensemble:
            from breastvision.models.ensemble import build_network

            return build_network(self)
        where = f"{self.source}: " if self.source else ""

        def build() -> torch.nn.Module:
            return create_model(
                self.architecture, num_classes=len(self.class_names), pretrained=None, **self.model_kwargs
            )

        try:
            model = build()
        except BreastvisionError as err:
            raise BreastvisionError(f"{where}{err}") from None
        except Exception as err:  # the file's model_kwargs reach the architecture's code unchecked
            raise BreastvisionError(
                f"{where}model_kwargs {self.model_kwargs} cannot build '{self.architecture}' "
                f"({type(err).__name__}: {one_line(err, 150)})"
            ) from None
        mismatch = describe_mismatch(model.state_dict(), self.state_dict)
        if mismatch:
            raise BreastvisionError(
                f"{where}the weights do not match architecture '{self.architecture}' with "
                f"{len(self.class_names)} classes ({mismatch})"
            )
        self._check_input_size(build, where)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def _check_input_size(self, build: Callable[[], torch.nn.Module], where: str) -> None:
        """One image of the file's input size through the architecture built on the meta device
        (shapes only: no memory, no arithmetic), so that a size it cannot take (a ViT's fixed patch
        grid, a DenseNet's pooling below 32 pixels) fails here in one line rather than on every batch
        later. Every registered architecture runs on the meta device (``tests/test_bundle.py``)."""
        side = self.preprocessing.input_size
        try:
            with torch.device("meta"), torch.inference_mode():
                build().eval()(torch.zeros(1, 3, side, side))
        except (RuntimeError, AssertionError, ValueError) as err:
            raise BreastvisionError(
                f"{where}architecture '{self.architecture}' cannot take the file's input_size {side} "
                f"({one_line(err, 150)})"
            ) from None


#: An absolute path (POSIX or Windows) not inside a URL or a relative path: first as lineage writes
#: files, ``PATH (sha256 ...)`` (spaces allowed), then any other space-free one.
_HASHED_PATH = re.compile(r"(?<![\w.~:/\\-])(?:/|[A-Za-z]:[\\/])[^()]*?(?= \(sha256 )")
_BARE_PATH = re.compile(r"(?<![\w.~:/\\-])(?:/|[A-Za-z]:[\\/])[^\s()'\",;]+")


def _file_name(match: re.Match[str]) -> str:
    return PureWindowsPath(match.group(0)).name if "\\" in match.group(0) else Path(match.group(0)).name


def _without_folders(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_folders(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_folders(v) for v in value]
    if isinstance(value, str):
        return _BARE_PATH.sub(_file_name, _HASHED_PATH.sub(_file_name, value))
    return value


def _safetensors_reason(err: Exception) -> str:
    text = one_line(err).removeprefix("Error while deserializing header: ")
    if "incomplete metadata" in text or "not fully covered" in text:
        return f"truncated: {text}"
    if "header too large" in text or "invalid header" in text or "header too small" in text:
        return f"not a safetensors file: {text}"
    return text


def check_model_path(path: str | Path) -> Path:
    """``path`` if it may be a model file; a one-line error if it is missing, a folder (a run's, say),
    empty, or a training checkpoint, naming the model file meant where there is one."""
    path = Path(path)
    if path.is_dir():
        inside = path / MODEL_FILE_NAME
        if inside.is_file():
            raise BreastvisionError(f"{path} is a run folder; its model file is {inside}")
        raise BreastvisionError(f"{path} is a folder, not a model file (run folders hold {MODEL_FILE_NAME})")
    if not path.is_file():
        raise BreastvisionError(f"model file not found: {path}")
    if path.stat().st_size == 0:
        raise BreastvisionError(f"{path} is empty (0 bytes), not a model file")
    if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
        raise BreastvisionError(_checkpoint_message(path))
    return path


def _checkpoint_message(path: Path) -> str:
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    hint = (
        f"its run's model file is {run / MODEL_FILE_NAME}" if (run / MODEL_FILE_NAME).is_file()
        else f"training writes {MODEL_FILE_NAME} into the run folder when it finishes"
    )
    weights = path.suffix.lower() in {".pt", ".pth"}
    what = "a PyTorch weights file (usable as model.pretrained)" if weights else "a training checkpoint"
    return f"{path} is {what}, not a model file; {hint}"


def _not_a_model_file(path: Path, err: Exception) -> str:
    if path.suffix.lower() == ".onnx":
        return f"{path} is an ONNX export; this needs the .safetensors model file it was exported from"
    with path.open("rb") as handle:
        if handle.read(4) == b"PK\x03\x04":  # torch.save's zip container, whatever the name
            return _checkpoint_message(path)
    return f"{path} is not a breastvision model file ({_safetensors_reason(err)})"
