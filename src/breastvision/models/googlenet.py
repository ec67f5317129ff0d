"""GoogLeNet (Inception v1), torchvision's architecture and weights, with timm's interface.

The baseline of paper 003's Table 4. Two choices the paper leaves open:

- **No auxiliary classifiers.** They only add training-time losses (torchvision itself drops them
  from its pretrained model); without them training is one cross-entropy like every other model
  here, and the model file holds exactly what prediction uses.
- **``transform_input`` always on.** torchvision's ImageNet GoogLeNet was ported from TensorFlow and
  expects inputs in [-1, 1]; ``transform_input`` maps an ImageNet-normalised tensor there. Keeping it
  on for random init too (a fixed affine map, harmless) means one input convention for every
  GoogLeNet and nothing extra to record in a model file.

``seg_head=True`` adds the auxiliary lesion-mask head on ``inception5b`` (``models.masking``), for
mask-guided training; classification and prediction never use it.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.googlenet import GoogLeNet as _TorchvisionGoogLeNet

from breastvision.models.layers import Call, classifier_or_identity, imagenet_cfg
from breastvision.models.masking import MaskHead, MaskHeadMixin
from breastvision.models.registry import register_model
from breastvision.models.weights import StateDict, WeightsSpec, apply_pretrained, torchvision_imagenet


class GoogLeNet(MaskHeadMixin, _TorchvisionGoogLeNet):
    def __init__(self, num_classes: int, drop_rate: float = 0.2, seg_head: bool = False):
        super().__init__(
            num_classes=max(num_classes, 1),
            aux_logits=False,
            transform_input=True,
            init_weights=True,
            dropout=drop_rate,
        )
        self.num_classes = num_classes
        self.num_features = 1024
        self.fc = classifier_or_identity(self.num_features, num_classes)
        self.pretrained_cfg = imagenet_cfg("fc", num_classes)
        # Drawn last, so a seed gives the same network with or without it.
        self.seg_head = MaskHead(self.num_features) if seg_head else None

    def _stem(self) -> nn.Sequential:
        return nn.Sequential(
            Call(self._transform_input), self.conv1, self.maxpool1, self.conv2, self.conv3, self.maxpool2
        )

    def _inception3(self) -> nn.Sequential:
        return nn.Sequential(self.inception3a, self.inception3b, self.maxpool3)

    def _inception4(self) -> nn.Sequential:
        return nn.Sequential(
            self.inception4a,
            self.inception4b,
            self.inception4c,
            self.inception4d,
            self.inception4e,
            self.maxpool4,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._inception4()(self._inception3()(self._stem()(x)))
        return self.inception5b(self.inception5a(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """Stem, the three Inception groups (the last ending in the pooled vector), classifier."""
        return [
            ("stem", self._stem()),
            ("inception3", self._inception3()),
            ("inception4", self._inception4()),
            ("inception5", nn.Sequential(self.inception5a, self.inception5b, self.avgpool, nn.Flatten(1))),
            ("head", nn.Sequential(self.dropout, self.fc)),
        ]


def _drop_aux(state: StateDict, _model: nn.Module) -> StateDict:
    """Checkpoints of torchvision's training-mode GoogLeNet carry the auxiliary heads we leave out."""
    return {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}


@register_model("googlenet")
def googlenet(
    num_classes: int, pretrained: WeightsSpec = None, drop_rate: float = 0.2, seg_head: bool = False
) -> GoogLeNet:
    """GoogLeNet without auxiliary heads (5.6M parameters without the classifier)."""
    model = GoogLeNet(num_classes, drop_rate, seg_head)
    model.weights_origin = apply_pretrained(
        model,
        pretrained,
        torchvision_imagenet("googlenet"),
        classifier="fc",
        adapt=_drop_aux,
        what="googlenet",
    )
    return model
