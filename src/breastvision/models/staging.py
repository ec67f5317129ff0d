"""A model as an ordered list of stages, and splitting it into a frozen prefix and a trainable suffix.

Staged transfer learning (paper 000: shallow blocks keep ImageNet features, deep blocks learn
LC25000, then BreakHis "mainly by freezing") and the frozen-feature cache both need the same thing:
cut the model between two stages so that ``suffix(prefix(x)) == model(x)``. The prefix is then
frozen and, being a fixed function of the image, its output can be computed once per image view.

Stages per architecture (the stage that ends the feature extractor also pools, so a split before
``head`` hands on the pooled feature vector, the cheapest thing to cache):

- ResNet: ``stem, layer1, layer2, layer3, layer4, head``
- GoogLeNet: ``stem, inception3, inception4, inception5, head``
- DenseNet(+SE): ``stem, denseblock1, transition1, denseblock2, transition2, denseblock3,
  transition3, denseblock4, head`` (SE blocks belong to their dense block or transition)
- ViT: ``patch_embed, block1, ..., block12, head``
- EfficientNet: ``stem, block1, ..., block7, conv_head, head``
- Fusion: ``cnn, vit, head`` (parallel branches: before ``head`` the prefix yields the 1280-d
  concatenation; before ``vit``, the pair ``(cnn_features, image)``)

The prefix and suffix share the model's parameters (they are views, not copies), so freezing the
prefix freezes those layers of the model.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from breastvision.errors import BreastvisionError


def _stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from timm.models.efficientnet import EfficientNet
    from timm.models.vision_transformer import VisionTransformer

    if hasattr(model, "stage_modules"):
        return model.stage_modules()
    if isinstance(model, VisionTransformer):
        from breastvision.models.vit import vit_stage_modules

        return vit_stage_modules(model)
    if isinstance(model, EfficientNet):
        from breastvision.models.efficientnet import efficientnet_stage_modules

        return efficientnet_stage_modules(model)
    raise BreastvisionError(f"no stages are defined for {type(model).__name__}")


def stages(model: nn.Module) -> list[str]:
    """The model's stage names, input to output."""
    return [name for name, _ in _stage_modules(model)]


def split_model(model: nn.Module, first_trainable_stage: str) -> tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)``: the stages before ``first_trainable_stage`` and the rest.

    The prefix is ``nn.Identity()`` when ``first_trainable_stage`` is the first stage.
    """
    modules = _stage_modules(model)
    names = [name for name, _ in modules]
    if first_trainable_stage not in names:
        arch = getattr(model, "architecture", type(model).__name__)
        raise BreastvisionError(
            f"'{first_trainable_stage}' is not a stage of {arch}; its stages are: {', '.join(names)}"
        )
    cut = names.index(first_trainable_stage)
    prefix = nn.Sequential(OrderedDict(modules[:cut])) if cut else nn.Identity()
    return prefix, nn.Sequential(OrderedDict(modules[cut:]))
