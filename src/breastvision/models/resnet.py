"""ResNet-18, torchvision's architecture (and weights), with timm's interface.

Paper 003's branch A: 7×7 convolution, max-pool, four residual stages, global average pooling →
512-d. Subclassing torchvision's ``ResNet`` keeps its state-dict keys, so torchvision's ImageNet
checkpoint (or any torchvision ResNet-18 file) loads unchanged. ``seg_head=True`` adds the
auxiliary lesion-mask head on ``layer4`` (``models.masking``), for mask-guided training.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock
from torchvision.models.resnet import ResNet as _TorchvisionResNet

from breastvision.models.layers import classifier_or_identity, imagenet_cfg
from breastvision.models.masking import MaskHead, MaskHeadMixin
from breastvision.models.registry import register_model
from breastvision.models.weights import WeightsSpec, apply_pretrained, torchvision_imagenet


class ResNet(MaskHeadMixin, _TorchvisionResNet):
    def __init__(self, block: type[BasicBlock], layers: list[int], num_classes: int, seg_head: bool = False):
        super().__init__(block, layers)
        self.num_classes = num_classes
        self.num_features = 512 * block.expansion
        self.fc = classifier_or_identity(self.num_features, num_classes)
        self.pretrained_cfg = imagenet_cfg("fc", num_classes)
        # Drawn last, so a seed gives the same network with or without it.
        self.seg_head = MaskHead(self.num_features) if seg_head else None

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """Stem, the four residual stages (the last one ending in the pooled vector), classifier."""
        return [
            ("stem", nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)),
            ("layer1", self.layer1),
            ("layer2", self.layer2),
            ("layer3", self.layer3),
            ("layer4", nn.Sequential(self.layer4, self.avgpool, nn.Flatten(1))),
            ("head", self.fc),
        ]


@register_model("resnet18")
def resnet18(num_classes: int, pretrained: WeightsSpec = None, seg_head: bool = False) -> ResNet:
    """ResNet-18 (11.2M parameters without the classifier)."""
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes, seg_head)
    model.weights_origin = apply_pretrained(
        model, pretrained, torchvision_imagenet("resnet18"), classifier="fc", what="resnet18"
    )
    return model
