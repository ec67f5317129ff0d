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
  concatenation; before ``vit``, the pair ``(cnn_features, image)``); or **per branch**, each
  branch's own stages: ``cnn.denseblock4,vit.block10`` (a string, as configs give it) or
  ``{"cnn": "denseblock4", "vit": "block10"}`` freezes each branch before its named stage and
  trains the rest of both with the head (``FusionNet.split_branches``; the prefix yields the
  pair ``(cnn_map, vit_tokens)``)

The prefix and suffix share the model's parameters (they are views, not copies), so freezing the
prefix freezes those layers of the model. A model with a mask head (``seg_head``, ``models.masking``)
gets a suffix that holds the head and has ``forward_with_mask`` too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

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


#: Stage spec: one stage name, or per branch of a composite model ``{"cnn": ..., "vit": ...}``.
StageSpec = str | Mapping[str, str]


def parse_stage_spec(spec: StageSpec) -> str | dict[str, str]:
    """A stage name unchanged; ``"cnn.denseblock4,vit.block10"`` → ``{"cnn": "denseblock4", ...}``."""
    if isinstance(spec, Mapping):
        return dict(spec)
    if "." not in spec:
        return spec
    parsed: dict[str, str] = {}
    for item in spec.split(","):
        branch, dot, stage = item.strip().partition(".")
        if not (branch and dot and stage) or branch in parsed:
            raise BreastvisionError(
                f"bad per-branch stage spec '{spec}': give BRANCH.STAGE once per branch, comma-separated "
                "(e.g. cnn.denseblock4,vit.block10)"
            )
        parsed[branch] = stage
    return parsed


def split_model(model: nn.Module, first_trainable_stage: StageSpec) -> tuple[nn.Module, nn.Module]:
    """``(prefix, suffix)``: the stages before ``first_trainable_stage`` and the rest.

    The prefix is ``nn.Identity()`` when ``first_trainable_stage`` is the first stage. A per-branch
    spec (see :func:`parse_stage_spec`) cuts every branch of a composite model at its own stage.
    With a mask head the suffix is a ``masking.MaskedSuffix`` (whose ``forward_with_mask`` needs
    the map the head reads to be computed by the suffix's stages).
    """
    spec = parse_stage_spec(first_trainable_stage)
    if isinstance(spec, dict):
        if not hasattr(model, "split_branches"):
            arch = getattr(model, "architecture", type(model).__name__)
            raise BreastvisionError(f"{arch} has no branches: per-branch stages need a fusion model")
        return model.split_branches(spec)
    first_trainable_stage = spec
    modules = _stage_modules(model)
    names = [name for name, _ in modules]
    if first_trainable_stage not in names:
        arch = getattr(model, "architecture", type(model).__name__)
        raise BreastvisionError(
            f"'{first_trainable_stage}' is not a stage of {arch}; its stages are: {', '.join(names)}"
        )
    cut = names.index(first_trainable_stage)
    prefix = nn.Sequential(OrderedDict(modules[:cut])) if cut else nn.Identity()
    suffix = nn.Sequential(OrderedDict(modules[cut:]))
    if getattr(model, "seg_head", None) is None:
        return prefix, suffix
    from breastvision.models.masking import MaskedSuffix

    return prefix, MaskedSuffix(suffix, model.seg_head, model.mask_source())


def split_stage_names(
    model: nn.Module, first_trainable_stage: StageSpec | None
) -> tuple[list[str], list[str]]:
    """``(frozen, trainable)`` stage names of a split, as a run records them.

    A per-branch spec names branch stages ``cnn.stem``, ``vit.block10``...; the fusion's ``head``
    always trains, and so does a mask head (``seg_head``, listed last), whatever the split. Errors
    are :func:`split_model`'s.
    """
    frozen, trainable = _split_names(model, first_trainable_stage)
    if getattr(model, "seg_head", None) is not None:
        trainable.append("seg_head")
    return frozen, trainable


def _split_names(model: nn.Module, first_trainable_stage: StageSpec | None) -> tuple[list[str], list[str]]:
    if first_trainable_stage is None:
        return [], stages(model)
    spec = parse_stage_spec(first_trainable_stage)
    split_model(model, spec)
    if isinstance(spec, str):
        names = stages(model)
        return names[: names.index(spec)], names[names.index(spec) :]
    frozen, trainable = [], []
    for branch, names in model.branch_stages().items():
        cut = names.index(spec[branch])
        frozen += [f"{branch}.{name}" for name in names[:cut]]
        trainable += [f"{branch}.{name}" for name in names[cut:]]
    return frozen, [*trainable, "head"]
