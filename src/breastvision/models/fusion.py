"""Dual-branch fusion (paper 003, System U): a CNN and a ViT in parallel on the same image.

``fusion_resnet18_vitb16`` is the paper's model: ResNet-18 (512-d, global average pooling) ∥
ViT-B/16 (768-d, mean over the patch tokens), concatenated to 1280-d, then a three-layer
fully-connected head. The paper gives neither the head's widths nor its regularisation; here it is
1280 → 512 → 256 → classes with ReLU and dropout 0.3 after each hidden layer (halving widths, the
usual funnel; moderate dropout because BUSI is small but the head is only 0.8M of the 97.8M
parameters). ``fusion`` builds the same thing from any two branches: a registered CNN
(``resnet18``, ``densenet121``, ``efficientnet_lite0``, ...) or any timm CNN name, and ``vit_b16``,
``vit_tiny`` or any timm ViT name, so the fusion can start from whatever pretrained backbones exist.

The branches may expect different input normalisations (torchvision CNNs: ImageNet mean/std; timm
ViTs: 0.5/0.5). The fusion takes its input normalised as its CNN expects (``pretrained_cfg``) and
re-normalises for the ViT branch with a fixed affine map (``layers.Renormalize``), so each branch
sees what its weights were trained on. Input size is the ViT's (ViTs need their fixed size).

**Per-branch stages.** Besides the coarse stages ``cnn, vit, head``, each branch keeps its own
stages (``branch_stages``), and ``split_branches({"cnn": "denseblock4", "vit": "block10"})`` cuts
both branches at once: the prefix runs both branches' frozen blocks on the image and yields the
pair ``(cnn_map, vit_tokens)`` (a fixed function of the image view, so cacheable per view); the
suffix runs the rest of each branch, concatenates and applies the head.

**Mask head** (``seg_head=True``, ``models.masking``): a 1×1 convolution on the CNN branch's last
spatial feature map, upsampled to the fusion's input size, trained as an auxiliary
lesion-segmentation task through ``forward_with_mask``; prediction never uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models._timm import build_timm
from breastvision.models.layers import Call, Renormalize, classifier_or_identity
from breastvision.models.masking import MaskHead, logits_and_mask, spatial_layer
from breastvision.models.registry import create_model, list_models, register_model
from breastvision.models.staging import split_model, stages
from breastvision.models.vit import build_vit
from breastvision.models.weights import RANDOM_INIT, WeightsSpec, describe_file, load_into, read_state_dict


def _pooled_size(branch: nn.Module) -> int:
    """Width of a feature extractor's output: timm's ``head_hidden_size`` where a model has a
    pre-logits layer after pooling (MobileNetV3), else ``num_features``."""
    return getattr(branch, "head_hidden_size", None) or branch.num_features


#: What owns the map a fusion's mask head reads, as its errors name it.
_CNN_BRANCH = "the CNN branch"


class BranchPrefix(nn.Module):
    """Both branches' frozen blocks on one image: ``(cnn_part, vit_part)``."""

    def __init__(self, cnn: nn.Module, vit: nn.Module, vit_input: nn.Module):
        super().__init__()
        self.cnn, self.vit, self.vit_input = cnn, vit, vit_input

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cnn(x), self.vit(self.vit_input(x))


class BranchSuffix(nn.Module):
    """The rest of both branches, concatenated, then the head; ``forward_with_mask`` adds the mask."""

    def __init__(
        self,
        cnn: nn.Module,
        vit: nn.Module,
        head: nn.Module,
        mask_head: MaskHead | None,
        spatial: nn.Module | None,
    ):
        super().__init__()
        self.cnn, self.vit, self.head, self.mask_head = cnn, vit, head, mask_head
        # A plain attribute, not a submodule: the layer already belongs to ``cnn`` (or to the prefix).
        self.__dict__["spatial"] = spatial

    def forward(self, parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cnn_part, vit_part = parts
        return self.head(torch.cat([self.cnn(cnn_part), self.vit(vit_part)], dim=1))

    def forward_with_mask(
        self, parts: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return logits_and_mask(self, parts, self.spatial, self.mask_head, _CNN_BRANCH)


class FusionNet(nn.Module):
    """``head(cat(cnn(x), vit(renormalise(x))))``; ``forward_features`` is the concatenation."""

    def __init__(
        self,
        cnn: nn.Module,
        vit: nn.Module,
        num_classes: int,
        head_hidden: tuple[int, ...] = (512, 256),
        head_drop: float = 0.3,
        seg_head: bool = False,
    ):
        super().__init__()
        self.cnn = cnn
        self.vit = vit
        cnn_cfg, vit_cfg = cnn.pretrained_cfg, vit.pretrained_cfg
        self.vit_input = Renormalize((cnn_cfg["mean"], cnn_cfg["std"]), (vit_cfg["mean"], vit_cfg["std"]))
        self.num_classes = num_classes
        self.num_features = _pooled_size(cnn) + _pooled_size(vit)
        dims = [self.num_features, *head_hidden]
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i, (width_in, width_out) in enumerate(zip(dims[:-1], dims[1:], strict=True), start=1):
            layers[f"fc{i}"] = nn.Linear(width_in, width_out)
            layers[f"act{i}"] = nn.ReLU()
            layers[f"drop{i}"] = nn.Dropout(head_drop)
        self.classifier_name = f"fc{len(dims)}"
        layers[self.classifier_name] = classifier_or_identity(dims[-1], num_classes)
        self.head = nn.Sequential(layers)
        self.pretrained_cfg = {
            "input_size": vit_cfg["input_size"],
            "mean": tuple(cnn_cfg["mean"]),
            "std": tuple(cnn_cfg["std"]),
            "interpolation": cnn_cfg.get("interpolation", "bilinear"),
            "crop_pct": cnn_cfg.get("crop_pct", 0.875),
            "classifier": f"head.{self.classifier_name}",
            "num_classes": num_classes,
        }
        # Built after the head, so a seed gives the same classifier with or without it.
        self.seg_head = None
        if seg_head:
            spatial_layer(cnn)  # an unsupported CNN fails when built, not at the first training step
            self.seg_head = MaskHead(cnn.num_features, vit_cfg["input_size"][1:])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cnn(x), self.vit(self.vit_input(x))], dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head[:-1](x) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_mask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, mask_logits)``, the latter B×1×H×W at the input size (training only)."""
        return logits_and_mask(self, x, self.mask_source(), self.seg_head, _CNN_BRANCH)

    def mask_source(self) -> nn.Module | None:
        """The CNN layer whose output map the mask head reads (``None`` without a mask head): a
        split must leave it in the trainable suffix for the head to train."""
        return spatial_layer(self.cnn) if self.seg_head is not None else None

    def _cnn_stage(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cnn(x), x

    def _vit_stage(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cnn_features, x = inputs
        return torch.cat([cnn_features, self.vit(self.vit_input(x))], dim=1)

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """cnn, vit, head. The branches are parallel, so a split before ``vit`` (CNN frozen, ViT
        trained) hands on ``(cnn_features, image)``; before ``head``, the 1280-d concatenation."""
        return [
            ("cnn", Call(self._cnn_stage, cnn=self.cnn)),
            ("vit", Call(self._vit_stage, vit=self.vit, vit_input=self.vit_input)),
            ("head", self.head),
        ]

    def branch_stages(self) -> dict[str, list[str]]:
        """Each branch's own stages (``staging.stages``), the names ``split_branches`` takes."""
        return {"cnn": stages(self.cnn), "vit": stages(self.vit)}

    def split_branches(self, first_trainable: Mapping[str, str]) -> tuple[BranchPrefix, BranchSuffix]:
        """``(prefix, suffix)`` cutting each branch before its own first trainable stage.

        ``first_trainable`` names a stage of every branch (``{"cnn": "denseblock4", "vit": "block10"}``);
        a branch's first stage trains it whole, its ``head`` freezes it whole (the pooled features).
        """
        branches = {"cnn": self.cnn, "vit": self.vit}
        unknown = sorted(set(first_trainable) - set(branches))
        missing = [name for name in branches if name not in first_trainable]
        if unknown or missing:
            problem = f"'{unknown[0]}' is not a branch" if unknown else f"no stage for branch '{missing[0]}'"
            raise BreastvisionError(
                f"{problem} of the fusion: name the first trainable stage of each of its branches "
                f"({', '.join(branches)}), e.g. cnn.{stages(self.cnn)[-2]},vit.{stages(self.vit)[-2]}"
            )
        parts = {}
        for name, branch in branches.items():
            try:
                parts[name] = split_model(branch, first_trainable[name])
            except BreastvisionError as err:
                raise BreastvisionError(f"fusion branch '{name}': {err}") from err
        spatial = spatial_layer(self.cnn) if self.seg_head is not None else None
        prefix = BranchPrefix(parts["cnn"][0], parts["vit"][0], self.vit_input)
        return prefix, BranchSuffix(parts["cnn"][1], parts["vit"][1], self.head, self.seg_head, spatial)


def _branch(name: str, pretrained: WeightsSpec, role: str) -> nn.Module:
    """A feature extractor (``num_classes=0``): a registered model, else a timm model by name."""
    if name in list_models() and not name.startswith("fusion"):
        return create_model(name, num_classes=0, pretrained=pretrained)
    if role == "vit":
        return build_vit(name, 0, pretrained)
    return build_timm(name, 0, pretrained)


def _flatten_origin(part: str, origin: dict[str, str]) -> dict[str, str]:
    return {(part if key == "backbone" else f"{part}.{key}"): value for key, value in origin.items()}


@register_model("fusion")
def fusion(
    num_classes: int,
    pretrained: WeightsSpec = None,
    cnn: str = "resnet18",
    vit: str = "vit_b16",
    head_hidden: tuple[int, ...] = (512, 256),
    head_drop: float = 0.3,
    cnn_pretrained: WeightsSpec = None,
    vit_pretrained: WeightsSpec = None,
    seg_head: bool = False,
) -> FusionNet:
    """CNN ∥ ViT fusion. ``pretrained="imagenet"`` means ImageNet for both branches; a file means
    a whole fusion checkpoint; ``cnn_pretrained`` / ``vit_pretrained`` set each branch alone."""
    whole_file = pretrained is not None and str(pretrained).strip().lower() != "imagenet"
    if whole_file and (cnn_pretrained is not None or vit_pretrained is not None):
        raise BreastvisionError("give either a whole-fusion weights file or per-branch weights, not both")
    if pretrained is not None and not whole_file:
        cnn_pretrained = cnn_pretrained or pretrained
        vit_pretrained = vit_pretrained or pretrained
    model = FusionNet(
        _branch(cnn, cnn_pretrained, "cnn"),
        _branch(vit, vit_pretrained, "vit"),
        num_classes,
        tuple(head_hidden),
        head_drop,
        seg_head,
    )
    if whole_file:
        source = f"file: {describe_file(pretrained)}"
        # A file with or without a mask head fits a fusion with or without one (``weights.load_into``).
        state = read_state_dict(pretrained)
        loaded = load_into(model, state, source, classifier=model.pretrained_cfg["classifier"])
        model.weights_origin = {"cnn": source, "vit": source, "head": source}
        if loaded.get("classifier") == RANDOM_INIT:
            model.weights_origin["head"] = f"{source}, final layer random init"
        if seg_head:
            model.weights_origin["seg_head"] = loaded.get("seg_head", source)
    else:
        model.weights_origin = {
            **_flatten_origin("cnn", model.cnn.weights_origin),
            **_flatten_origin("vit", model.vit.weights_origin),
            "head": RANDOM_INIT,
        }
        if seg_head:
            model.weights_origin["seg_head"] = RANDOM_INIT
    return model


@register_model("fusion_resnet18_vitb16")
def fusion_resnet18_vitb16(
    num_classes: int,
    pretrained: WeightsSpec = None,
    head_hidden: tuple[int, ...] = (512, 256),
    head_drop: float = 0.3,
    cnn_pretrained: WeightsSpec = None,
    vit_pretrained: WeightsSpec = None,
    seg_head: bool = False,
) -> FusionNet:
    """Paper 003's model: ResNet-18 ∥ ViT-B/16, 1280-d, three-layer head (97.8M parameters)."""
    return fusion(
        num_classes,
        pretrained,
        "resnet18",
        "vit_b16",
        head_hidden,
        head_drop,
        cnn_pretrained,
        vit_pretrained,
        seg_head,
    )
