"""Vision Transformers from timm, pooled by the **mean over the token sequence** (paper 003).

Paper 003's branch B: ViT-B/16, 224×224 input cut into 196 patches of 16×16, linear projection to
768-d, position embeddings, 12 encoder layers, then "sequence average pooling" → 768-d. timm's
``global_pool='avg'`` averages the 196 patch tokens; the class token stays in the sequence (so that
standard pretrained weights, which have one, load) but is left out of the mean, since the paper
pools the patch sequence and never mentions a class token. With average pooling timm applies the
final LayerNorm after pooling (``fc_norm``) instead of before; checkpoints saved for class-token
pooling name that same LayerNorm ``norm``, which :func:`adapt_vit_state` renames.

Registered: ``vit_b16`` (timm ``vit_base_patch16_224``, 85.8M parameters without the head),
``vit_tiny`` (``vit_tiny_patch16_224``, 5.5M; its Tiny-ImageNet weights are in
``../shared/weights``), and ``vit`` for any other timm ViT (``variant="vit_small_patch16_224"``).
Each keeps timm's ``pretrained_cfg``: these ViTs expect mean = std = 0.5, not ImageNet's.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models._timm import build_timm
from breastvision.models.layers import Call
from breastvision.models.registry import register_model
from breastvision.models.weights import StateDict, WeightsSpec


def adapt_vit_state(state: StateDict, model: nn.Module) -> StateDict:
    """timm's own ViT checkpoint conversion, then ``norm.*`` → ``fc_norm.*`` for average pooling."""
    state = checkpoint_filter_fn(state, model)
    pooled_norm = isinstance(model.norm, nn.Identity) and not isinstance(model.fc_norm, nn.Identity)
    if pooled_norm and "norm.weight" in state and "fc_norm.weight" not in state:
        state = {(f"fc_{k}" if k.startswith("norm.") else k): v for k, v in state.items()}
    return state


def build_vit(
    variant: str, num_classes: int, pretrained: WeightsSpec, **timm_kwargs: Any
) -> VisionTransformer:
    """Any timm ViT with mean pooling over the patch tokens."""
    model = build_timm(
        variant, num_classes, pretrained, adapt=adapt_vit_state, global_pool="avg", **timm_kwargs
    )
    if not isinstance(model, VisionTransformer):
        raise BreastvisionError(f"timm model '{variant}' is not a Vision Transformer")
    return model


def _embed(vit: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def vit_stage_modules(vit: VisionTransformer) -> list[tuple[str, nn.Module]]:
    """patch_embed (with class token and position embeddings), block1..blockN (the last one
    ending in the pooled token mean), head (the post-pool LayerNorm and the classifier)."""
    embed = Call(
        functools.partial(_embed, vit),
        patch_embed=vit.patch_embed,
        pos_drop=vit.pos_drop,
        patch_drop=vit.patch_drop,
        norm_pre=vit.norm_pre,
        cls_token=vit.cls_token,
        reg_token=vit.reg_token,
        pos_embed=vit.pos_embed,
    )
    blocks: list[tuple[str, nn.Module]] = [(f"block{i}", b) for i, b in enumerate(vit.blocks, start=1)]
    name, last = blocks[-1]
    blocks[-1] = (name, nn.Sequential(last, vit.norm, Call(vit.pool, attn_pool=vit.attn_pool)))
    return [("patch_embed", embed), *blocks, ("head", nn.Sequential(vit.fc_norm, vit.head_drop, vit.head))]


@register_model("vit_b16")
def vit_b16(num_classes: int, pretrained: WeightsSpec = None) -> VisionTransformer:
    """ViT-B/16 at 224×224 (paper 003's branch B)."""
    return build_vit("vit_base_patch16_224", num_classes, pretrained)


@register_model("vit_tiny")
def vit_tiny(num_classes: int, pretrained: WeightsSpec = None) -> VisionTransformer:
    """ViT-Tiny/16 at 224×224 (192-d, 12 layers, 3 heads): ViT-B/16's shape at 1/15 of the cost."""
    return build_vit("vit_tiny_patch16_224", num_classes, pretrained)


@register_model("vit")
def vit(
    num_classes: int, pretrained: WeightsSpec = None, variant: str = "vit_base_patch16_224"
) -> VisionTransformer:
    """Any timm ViT by name (``variant``), mean-pooled."""
    return build_vit(variant, num_classes, pretrained)
