"""Small building blocks shared by the architectures: input configs, re-normalisation, stage glue."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from breastvision.models.bundle import IMAGENET_MEAN, IMAGENET_STD


def imagenet_cfg(classifier: str, num_classes: int) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` of a torchvision ImageNet model (resize 256 → crop 224, bilinear)."""
    return {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bilinear",
        "crop_pct": 0.875,
        "classifier": classifier,
        "num_classes": num_classes,
    }


def classifier_or_identity(in_features: int, num_classes: int) -> nn.Module:
    """timm's convention: ``num_classes=0`` means no classifier, the model returns pooled features."""
    return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()


def _channel_tensor(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


class Renormalize(nn.Module):
    """Turn an input normalised with one mean/std into one normalised with another.

    Both branches of a fusion see the same image tensor, but their pretrained weights may expect
    different normalisations (ImageNet mean/std for torchvision CNNs, 0.5/0.5 for timm's ViTs); a
    fixed per-channel affine map gives each branch what its weights were trained on. Identity when
    the two agree. Non-persistent buffers: it is configuration, not weights.
    """

    def __init__(
        self, src: tuple[Sequence[float], Sequence[float]], dst: tuple[Sequence[float], Sequence[float]]
    ):
        super().__init__()
        (src_mean, src_std), (dst_mean, dst_std) = src, dst
        self.active = tuple(src_mean) != tuple(dst_mean) or tuple(src_std) != tuple(dst_std)
        src_mean, src_std, dst_mean, dst_std = map(_channel_tensor, (src_mean, src_std, dst_mean, dst_std))
        # x_dst = (x_src * s_std + s_mean - d_mean) / d_std  =  x_src * scale + shift
        self.register_buffer("scale", src_std / dst_std, persistent=False)
        self.register_buffer("shift", (src_mean - dst_mean) / dst_std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift if self.active else x


class Call(nn.Module):
    """A step given as a function, so that it can sit in an ``nn.Sequential`` stage.

    The function is stored as a plain attribute, not a submodule: a stage built from a model's
    method (ViT pooling, GoogLeNet's input transform) must not register the whole model as its
    child. Whatever the function reads that carries weights is passed as ``owned`` modules and
    parameters, so the stage's ``parameters()``, ``state_dict()``, ``train()``/``eval()`` and
    ``to()`` cover exactly what it computes with (the frozen-feature cache hashes ``state_dict()``).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], **owned: nn.Module | nn.Parameter | None):
        super().__init__()
        self.fn = fn
        for name, item in owned.items():
            if isinstance(item, nn.Parameter):
                self.register_parameter(name, item)
            elif item is not None:
                self.add_module(name, item)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
