"""Models registered by name and built by :func:`create_model`, timm style.

Our own small registry rather than timm's: timm's ``create_model(pretrained=True)`` means "timm's
hub weights", while here ``pretrained`` is ``None``, ``"imagenet"`` or a local file, per branch for
a fusion, and the torchvision architectures (ResNet-18, GoogLeNet, DenseNet-121) load
torchvision's weights. timm is still the machinery underneath wherever it fits: ViTs and
EfficientNet-Lite are timm models, any timm model name can serve as a fusion branch, and every model
has timm's ``forward_features`` / ``forward_head`` / ``num_features`` / ``pretrained_cfg``, so
``timm.data.resolve_data_config(model=model)`` gives its expected input size and normalisation.

Every built model also carries ``architecture`` (its registry name), ``model_kwargs`` (the
architecture arguments, without weight sources: what a model file needs to rebuild it) and
``weights_origin`` (what each part started from).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.weights import WeightsSpec

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}
#: Modules whose import registers the built-in architectures (imported on first use, so that
#: reading a model file's metadata does not pay for importing timm and torchvision).
_BUILTIN = ("resnet", "googlenet", "densenet", "vit", "efficientnet", "fusion")
#: Suffix of keyword arguments that name weights rather than architecture (``cnn_pretrained``).
WEIGHTS_KWARG_SUFFIX = "_pretrained"


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``fn(num_classes, pretrained, **kwargs) -> nn.Module`` under ``name``."""

    def decorator(fn: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name '{name}' is registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorator


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(f"breastvision.models.{module}")


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _load_builtin()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def check_model_name(name: str) -> None:
    """Raise ``BreastvisionError`` (naming close matches) unless ``name`` is a registered model."""
    _factory(name)


def _factory(name: str) -> ModelFactory:
    _load_builtin()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise BreastvisionError(f"unknown model '{name}'{hint} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def create_model(
    name: str,
    num_classes: int,
    pretrained: WeightsSpec | Mapping[str, WeightsSpec] = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    ``pretrained`` is ``None``, ``"imagenet"``, a weights file, or for a composite model a mapping
    from part to spec (``{"cnn": "imagenet", "vit": "vit.safetensors"}``), which is the same as
    passing ``cnn_pretrained=...``, ``vit_pretrained=...``. ``num_classes=0`` gives a feature
    extractor whose output is the pooled ``num_features``-d vector.
    """
    fn = _factory(name)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
        raise BreastvisionError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if isinstance(pretrained, Mapping):
        kwargs.update({f"{part}{WEIGHTS_KWARG_SUFFIX}": spec for part, spec in pretrained.items()})
        pretrained = None
    try:
        bound = inspect.signature(fn).bind(num_classes=num_classes, pretrained=pretrained, **kwargs)
    except TypeError as err:
        params = [p for p in inspect.signature(fn).parameters if p not in ("num_classes", "pretrained")]
        raise BreastvisionError(
            f"bad arguments for model '{name}' ({err}); it accepts: {', '.join(params) or 'nothing else'}"
        ) from err
    model = fn(num_classes=num_classes, pretrained=pretrained, **kwargs)
    model.architecture = name
    # Every architecture argument, defaults included, so a model file rebuilds the same model
    # even if a default changes later; weight sources are not architecture.
    bound.apply_defaults()
    model.model_kwargs = {
        k: v
        for k, v in bound.arguments.items()
        if k not in ("num_classes", "pretrained") and not k.endswith(WEIGHTS_KWARG_SUFFIX)
    }
    return model


def data_config(model: nn.Module) -> dict[str, Any]:
    """The input a model expects: ``input_size`` (C, H, W), ``mean``, ``std``, ``crop_pct``, ...

    timm's own resolution from ``model.pretrained_cfg``; the data pipeline normalises with this so
    that, e.g., ViT-Tiny gets mean = std = 0.5 and DenseNet ImageNet's mean/std.
    """
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model)
