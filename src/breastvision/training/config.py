"""Experiment configuration: YAML files validated into dataclasses, with ``key=value`` overrides.

One YAML file describes one training run (data, model, training); ``configs/`` holds the papers'
settings and CPU-sized variants. A config may start with ``extends: other.yaml`` (relative to the
file) and then list only what differs, so a variant never copies its parent. Overrides use dotted
keys (``train.epochs=2``, ``model.kwargs.drop_rate=0.25``); values are parsed as YAML scalars, so
``train.lr=1e-3`` is a float and ``data.stain=null`` clears a section.

Validation uses pydantic dataclasses (pydantic already comes with FastAPI) so that unknown keys,
wrong types and values outside a fixed list are refused with one clear line naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, PositiveFloat, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from breastvision.errors import BreastvisionError, describe_validation_error
from breastvision.models.bundle import ChannelMeans, ChannelStds, ImageSide
from breastvision.models.tta import TtaSet

WEIGHTS_ENV_VAR = "BREASTVISION_WEIGHTS"
_STRICT = ConfigDict(extra="forbid")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string (it wants ``1.0e-3``); configs mean the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclass(config=_STRICT)
class SplitConfig:
    """Which split: a protocol of ``breastvision.data.splits`` made now, or a saved split ``file``.

    Protocols: ``h_random_712`` (paper 000's image-level 7:1:2, leaky), ``h_random_712_after_aug``
    (7:1:2 after 5x augmentation, leakier), ``u_random_82`` (paper 003's 8:2, leaky),
    ``group_holdout`` and ``group_kfold`` (leak-free, the defaults).
    """

    protocol: str = "group_holdout"
    file: str | None = None
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass(config=_STRICT)
class ViewConfig:
    """The fixed set of views each training image contributes (the papers' offline augmentation).

    ``identity``: the image itself, once. ``dihedral``: the named rotations/flips (paper 000's five,
    ``breastvision.data.transforms.DIHEDRAL_5``; add ``identity`` to keep the original too).
    ``random``: ``count`` draws ``aug0 … aug<count-1>`` of the ``augment`` pipeline (paper 003's
    "expanded 5x"), each a fixed function of (image, view name, ``seed``) so that frozen-layer
    outputs can be cached; with ``fresh_each_epoch`` the draws change every epoch instead (no
    caching; for GPU runs). ``include_identity`` (``random`` only) adds the image as evaluated to
    the draws, so a mild augmentation widens the training views rather than replacing the one every
    test image is seen as (and its cached features are the ones validation and test share).
    A split made after augmentation (``*_after_aug``) dictates the views.
    """

    kind: Literal["identity", "dihedral", "random"] = "identity"
    names: list[str] = Field(default_factory=lambda: ["rot90", "rot180", "rot270", "hflip", "vflip"])
    count: int = Field(default=5, ge=1)
    augment: str | dict[str, Any] = "busi_paper"
    seed: int = 0
    fresh_each_epoch: bool = False
    include_identity: bool = False


@dataclass(config=_STRICT)
class StainConfig:
    """Stain normalisation fitted on one reference image (``auto``: the most typical training image,
    ``breastvision.data.stain.choose_reference``); normalised images are cached on disk."""

    method: Literal["macenko", "reinhard"] = "macenko"
    reference: str = "auto"
    cache_dir: str | None = None


@dataclass(config=_STRICT)
class DataConfig:
    source: str = "busi"
    root: str | None = None
    #: Keyword options for the dataset reader (``breastvision.data.readers.read_dataset``).
    options: dict[str, Any] = Field(default_factory=dict)
    split: SplitConfig = Field(default_factory=SplitConfig)
    #: Fold index for k-fold protocols; ``None`` for hold-out splits.
    fold: int | None = None
    #: An external validation set (paper 003's hospital images): any dataset folder or manifest.
    external_val: str | None = None
    #: Share of the training groups held out for validation when the split has no ``val`` part
    #: and no external set is given (paper 003's split is train/test only).
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    #: Input side; ``None``: the model's own (``breastvision.models.registry.data_config``).
    input_size: ImageSide | None = None
    #: Side of the square resize before the crop to ``input_size``; ``None``: resize to ``input_size``.
    resize: ImageSide | None = None
    #: Normalisation, one value per RGB channel; ``None``: what the model's pretrained weights expect.
    mean: ChannelMeans | None = None
    std: ChannelStds | None = None
    #: µm per pixel (x, y) of the model input, recorded in the model file for whole-slide
    #: prediction; ``None``: derived for BreakHis from the magnification, else unknown.
    mpp: tuple[PositiveFloat, PositiveFloat] | None = None
    views: ViewConfig = Field(default_factory=ViewConfig)
    stain: StainConfig | None = None
    #: Test-time augmentation of the validation predictions (``val_predictions.csv``, what the
    #: temperature and operating points are fitted on) and of the test pass: ``dihedral8`` averages
    #: the 8 dihedral views, ``hflip`` the image and its mirror (``data.transforms.TTA_VIEWS``;
    #: image-level splits). Also the set the model file's ``--tta`` averages; ``None``: no TTA here,
    #: and the model file gets its modality's set (``models.tta``).
    tta: TtaSet | None = None
    num_workers: int = Field(default=0, ge=0)


@dataclass(config=_STRICT)
class ModelConfig:
    name: str = "resnet18"
    #: ``None`` (random init), ``imagenet``, a weights file (relative paths are looked up under
    #: ``weights_root``), a previous stage's ``model.safetensors``, or one such value per part
    #: of a composite model (``{cnn: imagenet, vit: vit_tiny.safetensors}``).
    pretrained: str | dict[str, str | None] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Every stage before this one (``breastvision.models.staging.stages``) is frozen.
    first_trainable_stage: str | None = None

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        """An unknown architecture fails with the config, not after the data is read."""
        from breastvision.models.registry import check_model_name

        try:
            check_model_name(name)
        except BreastvisionError as err:
            raise ValueError(str(err)) from None
        return name


@dataclass(config=_STRICT)
class TrainConfig:
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int | None = Field(default=None, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    scheduler: Literal["none", "step", "cosine"] = "none"
    step_size: int = Field(default=10, ge=1)
    gamma: float = Field(default=0.1, gt=0)
    loss: Literal["cross_entropy"] = "cross_entropy"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    #: Class weights of the training loss: ``balanced`` weighs class ``c`` by ``n / (K · n_c)``
    #: over the training items (scikit-learn's ``compute_class_weight("balanced")``).
    class_weighting: Literal["none", "balanced"] = "none"
    #: Training order per epoch: ``shuffle`` (each item once) or ``balanced`` (as many items, drawn
    #: with replacement with equal probability per class); both a function of (seed, epoch).
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    #: Weight ``w`` of the auxiliary lesion-mask loss (training loss CE + w · mask loss,
    #: ``training.segmentation``); > 0 needs a model built with ``model.kwargs.seg_head: true``
    #: (DenseNet-121(+SE), ResNet-18, GoogLeNet, or a fusion on their or EfficientNet's map), its
    #: CNN's last block trainable and training images with masks (BUSI).
    mask_loss_weight: float = Field(default=0.0, ge=0)
    #: Mixup (Zhang et al. 2018) with ``λ ~ Beta(α, α)``, α this value (0: off): every training batch
    #: is blended with a shuffled copy of itself, ``λ·a + (1 − λ)·b``, the loss (and lesion masks)
    #: likewise. It blends the frozen prefix's outputs (the images when nothing is frozen): manifold
    #: mixup at the cut (Verma et al. 2019), the form cached features allow, the same uncached.
    mixup_alpha: float = Field(default=0.0, ge=0)
    #: Exponential moving average of the trainable weights and buffers (``loop.make_ema``): after
    #: every optimizer step ``w̄ ← d·w̄ + (1 − d)·w``. With ``d`` > 0 the epochs are validated, the
    #: best epoch chosen and the model file written with the averaged weights; 0 turns it off.
    ema_decay: float = Field(default=0.0, ge=0, lt=1)
    seed: int = 0
    #: ``auto``: bf16-mixed on CUDA when supported, else 16-mixed; 32-true on CPU.
    precision: str = "auto"
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps"] = "auto"
    devices: int | str = 1
    #: Fabric strategy: ``auto``, ``ddp`` (re-runs the command per process), ``ddp_spawn``.
    strategy: str = "auto"
    #: Cache the frozen prefix's outputs per image view: ``true``, ``false``, or ``auto``: whenever
    #: a prefix is frozen, the views are fixed and the prefix outputs one tensor.
    cache_features: bool | Literal["auto"] = "auto"
    #: Where cached features persist between runs (``auto``: ``$BREASTVISION_CACHE/features``,
    #: else ``~/.cache/breastvision/features``); ``None``: memory only.
    cache_dir: str | None = "auto"
    #: How the cache computes the prefix: ``onnxruntime`` on CPU in float32 (checked against eager
    #: on every run, else eager: see ``training.feature_cache``), ``eager``: PyTorch always.
    cache_backend: Literal["onnxruntime", "eager"] = "onnxruntime"
    #: Validation metric that picks the best checkpoint: accuracy, loss, or the macro recall
    #: (mean of the classes' recalls, history.csv's ``val_recall_macro``).
    monitor: Literal["val_acc", "val_loss", "val_recall_macro"] = "val_acc"
    progress: Literal["auto", "rich", "none"] = "auto"
    threads: int | None = Field(default=None, ge=1)


@dataclass(config=_STRICT)
class ExperimentConfig:
    name: str = "experiment"
    #: Stage name recorded in the model's lineage (e.g. ``lc25000`` for transfer stage 2).
    stage: str | None = None
    output_dir: str = "runs/{name}"
    #: Folder that relative weight files are looked up in; ``None``: ``$BREASTVISION_WEIGHTS``,
    #: else ``weights/`` beside the data root (:func:`weights_root`).
    weights_root: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir.format(name=self.name)).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weights_root(
    explicit: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None
) -> Path:
    """Where relative weight files live: ``explicit`` (the config's ``weights_root``), else
    ``$BREASTVISION_WEIGHTS``, else ``weights/`` beside the data root (``paths.data_root(data_root)``;
    ``../shared/weights`` beside ``../shared/data``), so that it follows ``--data``."""
    from breastvision.paths import data_root as find_data_root

    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(WEIGHTS_ENV_VAR):
        return Path(os.environ[WEIGHTS_ENV_VAR]).expanduser()
    return find_data_root(data_root).expanduser().resolve().parent / "weights"


def resolve_weights(value: str | None, root: Path) -> str | None:
    """A ``pretrained`` value with relative file names resolved against ``root``.

    Keywords (``imagenet``) and ``None`` pass through; an existing path relative to the working
    directory wins over one under ``root``; a file found in neither place is a clear error.
    """
    if value is None or "/" not in value and "." not in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists():
        if not path.exists():
            raise BreastvisionError(f"pretrained weights not found: {path}")
        return str(path)
    candidate = root / path
    if not candidate.exists():
        raise BreastvisionError(
            f"pretrained weights '{value}' not found in {Path.cwd()} nor in the weights root {root} "
            f"(set weights_root or ${WEIGHTS_ENV_VAR})"
        )
    return str(candidate)


def read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping, with its ``extends`` chain merged in (parents first)."""
    if not path.is_file():
        raise BreastvisionError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise BreastvisionError(f"config {path} extends itself (cycle: {' -> '.join(map(str, seen))})")
    try:
        raw = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise BreastvisionError(f"config {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(raw, dict):
        raise BreastvisionError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return _merge(read_yaml(path.parent / parent, (*seen, path.resolve())), raw)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``raw`` with each ``dotted.key=value`` applied (value parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise BreastvisionError(f"override '{item}' is not of the form key=value (e.g. train.epochs=2)")
        try:
            value = _yaml_load(text)
        except yaml.YAMLError as err:
            raise BreastvisionError(f"override '{item}': value is not valid YAML") from err
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise BreastvisionError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    return f"config {source}: {describe_validation_error(err)}"


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain mapping into an :class:`ExperimentConfig`."""
    try:
        return ExperimentConfig(**raw)
    except ValidationError as err:
        raise BreastvisionError(format_validation_error(err, source)) from None
    except TypeError as err:  # a section given as a scalar, e.g. ``data: busi``
        raise BreastvisionError(f"config {source}: {err}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML config (following ``extends``), apply ``overrides``, validate. A file name
    that does not exist here is looked up among the shipped configs (``paths.config_path``)."""
    from breastvision.paths import config_path

    path = config_path(path)
    return config_from_dict(apply_overrides(read_yaml(path), overrides), str(path))
