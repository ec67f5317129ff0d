"""Stages and the prefix/suffix split that staged freezing and the feature cache rely on."""

from __future__ import annotations

import pytest
import torch

from breastvision.errors import BreastvisionError
from breastvision.models.registry import create_model
from breastvision.models.staging import split_model, stages

DENSENET_STAGES = [
    "stem", "denseblock1", "transition1", "denseblock2", "transition2",
    "denseblock3", "transition3", "denseblock4", "head",
]  # fmt: skip
CASES = [
    ("resnet18", {}, 64, ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    ("googlenet", {}, 64, ["stem", "inception3", "inception4", "inception5", "head"]),
    ("densenet121", {}, 64, DENSENET_STAGES),
    ("densenet121_se", {}, 64, DENSENET_STAGES),
    ("efficientnet_lite0", {}, 64, ["stem", *[f"block{i}" for i in range(1, 8)], "conv_head", "head"]),
    ("vit_tiny", {}, 224, ["patch_embed", *[f"block{i}" for i in range(1, 13)], "head"]),
    ("fusion", {"cnn": "resnet18", "vit": "vit_tiny"}, 224, ["cnn", "vit", "head"]),
]


@pytest.mark.parametrize(("name", "kwargs", "side", "expected"), CASES)
def test_every_split_composes_to_the_model(name, kwargs, side, expected):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).eval()
    assert stages(model) == expected
    x = torch.randn(1, 3, side, side)
    all_params = {id(p) for p in model.parameters()}
    with torch.no_grad():
        reference = model(x)
        for stage in expected:
            prefix, suffix = split_model(model, stage)
            torch.testing.assert_close(suffix(prefix(x)), reference, rtol=0, atol=1e-5)
            # Views of the model, not copies, and together exactly the model: freezing the prefix
            # freezes those layers, and the feature cache's hash of the prefix covers its weights.
            before = {id(p) for p in prefix.parameters()}
            after = {id(p) for p in suffix.parameters()}
            assert before.isdisjoint(after)
            assert before | after == all_params, stage


def test_prefix_before_head_yields_pooled_features():
    model = create_model("densenet121_se", num_classes=2).eval()
    prefix, suffix = split_model(model, "head")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        cached = prefix(x)
        assert cached.shape == (2, 1024)
        torch.testing.assert_close(cached, model.forward_head(model.forward_features(x), pre_logits=True))
    assert [n for n, p in suffix.named_parameters()] == ["head.1.weight", "head.1.bias"]


def test_fusion_prefix_outputs():
    model = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        concatenated = split_model(model, "head")[0](x)
        cnn_features, image = split_model(model, "vit")[0](x)
        torch.testing.assert_close(concatenated, model.forward_features(x))
    assert concatenated.shape == (1, 512 + 192)
    assert cnn_features.shape == (1, 512) and image is x
    prefix, suffix = split_model(model, "cnn")
    assert isinstance(prefix, torch.nn.Identity)


def test_unknown_stage_is_a_clear_error():
    model = create_model("resnet18", num_classes=2)
    with pytest.raises(BreastvisionError, match="'layer5' is not a stage of resnet18; its stages are: stem"):
        split_model(model, "layer5")
