"""The auxiliary lesion-mask head (``seg_head``) of a CNN, alone or as a fusion's CNN branch.

A 1×1 convolution on the CNN's last spatial feature map (the layer :func:`spatial_layer` names per
family), trained as an auxiliary segmentation task through ``forward_with_mask(x) -> (logits,
mask_logits)``. ``forward`` and the classification never use it, so prediction needs no mask and a
model file with a head predicts exactly as the same weights without it. The head reads the map
through a forward hook on the layer that produces it, so one mechanism serves the whole model and
a split suffix (:class:`MaskedSuffix`, what ``staging.split_model`` gives for a model with a head)
alike; a split whose frozen prefix computes that layer leaves the head nothing to read.

**Resolution.** A fusion's input size is fixed (its ViT's), so its head upsamples to it. A single
CNN takes any input size, so its head (no ``size``) gives the map's resolution and the loss and
the Dice bring the logits to their mask's size with :func:`at_size`, the same bilinear
upsampling the fusion's head does itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from breastvision.errors import BreastvisionError

#: State-dict keys of a mask head: a checkpoint trained without one lacks them (the head starts
#: random), a model without one leaves a checkpoint's out (``weights.load_into``).
MASK_HEAD_KEYS = r"^seg_head\."


def _families() -> tuple[tuple[type[nn.Module], str], ...]:
    """Per CNN family, the layer whose output is the last spatial feature map (``forward_features``):
    it runs both in the model's ``forward`` and in its staged blocks, so a hook on it serves both."""
    from timm.models.efficientnet import EfficientNet

    from breastvision.models.densenet import DenseNet
    from breastvision.models.googlenet import GoogLeNet
    from breastvision.models.resnet import ResNet

    return (DenseNet, "features.norm5"), (ResNet, "layer4"), (GoogLeNet, "inception5b"), (EfficientNet, "bn2")


def spatial_layer(cnn: nn.Module) -> nn.Module:
    """The layer of ``cnn`` whose output map a mask head reads."""
    families = _families()
    for family, name in families:
        if isinstance(cnn, family):
            return cnn.get_submodule(name)
    known = ", ".join(family.__name__ for family, _ in families)
    raise BreastvisionError(
        f"a mask head needs a CNN branch of a known family ({known}), not {type(cnn).__name__}"
    )


def at_size(mask_logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """B×1×h×w mask logits bilinearly resized to ``size`` (H, W); unchanged when already that size."""
    size = tuple(size)
    if tuple(mask_logits.shape[-2:]) == size:
        return mask_logits
    return nn.functional.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)


class MaskHead(nn.Module):
    """A 1×1 convolution to one logit per feature-map position, upsampled to ``size`` when given
    (module docstring: a fusion's fixed input size), else at the map's resolution."""

    def __init__(self, channels: int, size: Sequence[int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)
        self.size = None if size is None else tuple(size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.conv(features)
        return logits if self.size is None else at_size(logits, self.size)


@contextmanager
def captured_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``module`` during the ``with`` block, for a head that reads an inner layer
    without changing the ``forward`` that computes it."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def logits_and_mask(
    forward: Callable[[Any], torch.Tensor],
    inputs: Any,
    spatial: nn.Module | None,
    mask_head: MaskHead | None,
    cnn: str = "the CNN",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(forward(inputs), mask_head(the map spatial produced meanwhile))``; ``cnn`` names the
    network that owns ``spatial`` in the error a split freezing it gets."""
    if mask_head is None or spatial is None:
        raise BreastvisionError("this model has no mask head: build it with seg_head=True")
    with captured_output(spatial) as maps:
        logits = forward(inputs)
    if not maps:
        raise BreastvisionError(
            f"the mask head reads {cnn}'s last feature map, which this split freezes: "
            f"make {cnn}'s last block trainable"
        )
    return logits, mask_head(maps[-1])


class MaskHeadMixin:
    """``forward_with_mask`` and ``mask_source`` for a single CNN whose ``seg_head`` is a
    :class:`MaskHead` (or ``None``) on its :func:`spatial_layer`."""

    seg_head: MaskHead | None

    def mask_source(self) -> nn.Module | None:
        """The layer whose output map the mask head reads (``None`` without a mask head): a split
        must leave it in the trainable suffix for the head to train."""
        return spatial_layer(self) if self.seg_head is not None else None

    def forward_with_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, mask_logits)``, the latter B×1×h×w at the feature map's resolution (training only)."""
        return logits_and_mask(self, x, self.mask_source(), self.seg_head)


class MaskedSuffix(nn.Module):
    """A split suffix (``stages``) of a model with a mask head: ``forward`` is the stages',
    ``forward_with_mask`` adds the head on ``spatial``'s map (if the stages compute it)."""

    def __init__(self, stages: nn.Module, mask_head: MaskHead, spatial: nn.Module):
        super().__init__()
        self.stages, self.mask_head = stages, mask_head
        # A plain attribute, not a submodule: the layer already belongs to ``stages`` (or to the prefix).
        self.__dict__["spatial"] = spatial

    def forward(self, x: Any) -> torch.Tensor:
        return self.stages(x)

    def forward_with_mask(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_mask(self.stages, x, self.spatial, self.mask_head)
