"""DenseNet-121 and DenseNet-121 + SE (paper 000, System H), torchvision's architecture and keys.

Where the SE blocks go (paper 000, section 4.2 and Fig. 6): "the SE module is embedded after the
sub-modules of the dense blocks and after the transition layers". How we read it:

- **After every dense layer, on the concatenated output** (the block's running feature map, input
  channels + 32), not on the layer's 32 new channels. A dense block's "sub-module" is the whole
  unit, BN-ReLU-conv1×1-BN-ReLU-conv3×3 plus its concatenation (in the Keras DenseNet the paper's
  weights come from, ``conv_block`` returns the concatenation), so the SE gate sees and rescales
  every channel the next layer reads. The paper's Table 4 agrees: SE adds about 1.1M parameters
  (7.138M → 8.256M), an order of magnitude more than SE on the 32 new channels could (about 10k
  for all 58); SE on the concatenated outputs adds 3.0M at the standard reduction 16 (the paper's
  count is consistent with a reduction of about 40, which it never states). So the dense blocks
  here concatenate sequentially, ``x = se_i(cat(x, layer_i(x)))``, which without SE is exactly
  torchvision's dense block.
- **After every transition layer** (conv 1×1 + average pooling), on its output.
- 58 + 3 = **61** SE blocks for DenseNet-121 (6 + 12 + 24 + 16 dense layers, 3 transitions).

SE blocks start near the identity so ImageNet (or LC25000) features survive their insertion: the
gate is ``2·sigmoid(z)`` instead of ``sigmoid(z)`` and the excitation's last layer starts at
(almost) zero, so every gate starts at ≈1 instead of the 0.5 a textbook SE block starts at — 61
multiplications by 0.5 would scramble what the pretrained BatchNorm statistics expect. The gate
still spans (0, 2): the block can suppress a channel completely, or amplify it. The last layer's
weights are small random numbers, not zeros, so the first layer receives a gradient from step one.

Dropout 0.25 before the classifier, for both variants (paper 000, Table 2). torchvision's own
``drop_rate`` (dropout inside every dense layer) is not what the paper describes and stays 0.

``seg_head=True`` adds the auxiliary lesion-mask head on ``features.norm5`` (``models.masking``),
for mask-guided training; classification and prediction never use it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from timm.layers import SEModule
from torch import nn
from torchvision.models.densenet import DenseNet as _TorchvisionDenseNet
from torchvision.models.densenet import _DenseBlock

from breastvision.models.layers import classifier_or_identity, imagenet_cfg
from breastvision.models.masking import MaskHead, MaskHeadMixin
from breastvision.models.registry import register_model
from breastvision.models.weights import (
    StateDict,
    WeightsSpec,
    apply_pretrained,
    torchvision_imagenet,
)

#: State-dict keys of the SE blocks: ``features.denseblockN.seI.*`` and ``features.transitionN.se.*``.
SE_KEY_PATTERN = r"\.se\d*\."
#: std of the excitation's last layer at init: gates start within about 1e-3 of 1.
_SE_INIT_STD = 1e-3


class DoubledSigmoid(nn.Module):
    """``2·sigmoid(x)``: 1 at x = 0, so a zero-initialised SE block is the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(x)


def se_block(channels: int, reduction: int) -> SEModule:
    """timm's SE module (squeeze: global mean; excitation: 1×1 conv C→C/r, ReLU, 1×1 conv C/r→C)."""
    se = SEModule(channels, rd_channels=max(1, channels // reduction), gate_layer=DoubledSigmoid)
    nn.init.normal_(se.fc2.weight, std=_SE_INIT_STD)
    nn.init.zeros_(se.fc2.bias)
    return se


class SEDenseBlock(nn.ModuleDict):
    """A torchvision dense block with an SE block after every dense layer's concatenation.

    Keeps torchvision's ``denselayerI`` modules (and keys); adds ``seI``.
    """

    def __init__(self, block: _DenseBlock, reduction: int):
        super().__init__()
        for i, (name, layer) in enumerate(block.items(), start=1):
            self.add_module(name, layer)
            self.add_module(
                f"se{i}", se_block(layer.norm1.num_features + layer.conv2.out_channels, reduction)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(self) // 2 + 1):
            x = self[f"se{i}"](torch.cat([x, self[f"denselayer{i}"](x)], 1))
        return x


class DenseNet(MaskHeadMixin, _TorchvisionDenseNet):
    """torchvision DenseNet-BC, optionally with SE blocks and a mask head, dropout before the classifier."""

    def __init__(
        self,
        block_config: tuple[int, int, int, int],
        num_classes: int,
        drop_rate: float = 0.25,
        se_reduction: int | None = None,
        seg_head: bool = False,
    ):
        super().__init__(block_config=block_config)
        self.num_classes = num_classes
        self.num_features = self.classifier.in_features
        # SE blocks are drawn before the classifier so that, for one seed, the backbone's initial
        # weights do not depend on the number of classes (frozen prefixes of an LC25000 stage and
        # a BreakHis stage then hash alike and share cached features).
        if se_reduction is not None:
            for name, module in list(self.features.named_children()):
                if isinstance(module, _DenseBlock):
                    setattr(self.features, name, SEDenseBlock(module, se_reduction))
                elif name.startswith("transition"):
                    module.add_module("se", se_block(module.conv.out_channels, se_reduction))
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = classifier_or_identity(self.num_features, num_classes)
        if isinstance(self.classifier, nn.Linear):  # torchvision's init: zero classifier bias
            nn.init.zeros_(self.classifier.bias)
        self.pretrained_cfg = imagenet_cfg("classifier", num_classes)
        # Drawn last, so a seed gives the same network with or without it.
        self.seg_head = MaskHead(self.num_features) if seg_head else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """stem, denseblock1, transition1, ..., denseblock4 (with norm5, ending pooled), head.

        These are the units paper 000's transfer learning freezes: "shallow" and "deep" layers are
        runs of dense blocks and transitions.
        """
        f = self.features
        stages: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0))]
        for name, module in f.named_children():
            if name == "denseblock4":
                module = nn.Sequential(module, f.norm5, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            if name.startswith(("denseblock", "transition")):
                stages.append((name, module))
        stages.append(("head", nn.Sequential(self.head_drop, self.classifier)))
        return stages


_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _fix_old_keys(state: StateDict, _model: nn.Module) -> StateDict:
    """Original torchvision DenseNet files name ``norm.1`` what the model calls ``norm1``."""
    return {(_OLD_KEY.sub(r"\1\2", k)): v for k, v in state.items()}


def _build(
    num_classes: int, pretrained: WeightsSpec, drop_rate: float, se_reduction: int | None, seg_head: bool
) -> DenseNet:
    model = DenseNet((6, 12, 24, 16), num_classes, drop_rate, se_reduction, seg_head)
    model.weights_origin = apply_pretrained(
        model,
        pretrained,
        torchvision_imagenet("densenet121"),
        classifier="classifier",
        new_parts={"se": SE_KEY_PATTERN} if se_reduction is not None else None,
        adapt=_fix_old_keys,
        what="densenet121",
    )
    if se_reduction is not None and "se" not in model.weights_origin:
        model.weights_origin.setdefault("se", model.weights_origin["backbone"])
    return model


@register_model("densenet121")
def densenet121(
    num_classes: int, pretrained: WeightsSpec = None, drop_rate: float = 0.25, seg_head: bool = False
) -> DenseNet:
    """DenseNet-121 (7.0M parameters without the classifier); dropout before the classifier."""
    return _build(num_classes, pretrained, drop_rate, None, seg_head)


@register_model("densenet121_se")
def densenet121_se(
    num_classes: int,
    pretrained: WeightsSpec = None,
    drop_rate: float = 0.25,
    se_reduction: int = 16,
    seg_head: bool = False,
) -> DenseNet:
    """DenseNet-121 with 61 near-identity SE blocks (58 dense layers + 3 transitions)."""
    return _build(num_classes, pretrained, drop_rate, se_reduction, seg_head)
