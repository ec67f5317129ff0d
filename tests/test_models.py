"""Model registry, shapes, parameter counts and gradient flow (small inputs, CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.layers import Renormalize
from breastvision.models.registry import create_model, data_config, list_models

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

#: (name, kwargs, input side, pooled feature size). CNNs accept 64×64; ViTs need their 224.
SMALL_MODELS = [
    ("resnet18", {}, 64, 512),
    ("googlenet", {}, 64, 1024),
    ("densenet121", {}, 64, 1024),
    ("densenet121_se", {}, 64, 1024),
    ("efficientnet_lite0", {}, 64, 1280),
    ("vit_tiny", {}, 224, 192),
    ("fusion", {"cnn": "resnet18", "vit": "vit_tiny"}, 224, 512 + 192),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_paper_models():
    names = list_models()
    for name in (
        "resnet18",
        "vit_b16",
        "googlenet",
        "fusion_resnet18_vitb16",
        "densenet121",
        "densenet121_se",
    ):
        assert name in names
    assert list_models("densenet*") == ["densenet121", "densenet121_se"]


@pytest.mark.parametrize(("name", "kwargs", "side", "features"), SMALL_MODELS)
def test_shapes_and_timm_interface(name, kwargs, side, features):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        composed = model.forward_head(model.forward_features(x))
    assert logits.shape == (1, 3)
    torch.testing.assert_close(composed, logits)
    assert model.num_features == features
    if name != "fusion":  # the fusion's pre-logits are its head's last hidden layer
        assert pooled.shape == (1, features)
    assert model.architecture == name
    assert model.weights_origin["backbone" if name != "fusion" else "cnn"] == "random init"


@pytest.mark.parametrize("name", ["resnet18", "densenet121_se", "efficientnet_lite0"])
def test_num_classes_zero_gives_pooled_features(name):
    model = create_model(name, num_classes=0).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, model.num_features)


def test_parameter_counts():
    with torch.device("meta"):  # counting needs no memory and no initialisation
        fusion = create_model("fusion_resnet18_vitb16", num_classes=3)
        vit = create_model("vit_b16", num_classes=0)
        densenet = create_model("densenet121", num_classes=1000)
        resnet = create_model("resnet18", num_classes=1000)
    # Paper 003: ResNet-18 (11.2M) + ViT-B/16 (85.8M) + a three-layer head ≈ 97M.
    assert 96.5e6 < n_params(fusion) < 98.5e6
    assert n_params(fusion.head) == 1280 * 512 + 512 + 512 * 256 + 256 + 256 * 3 + 3
    assert n_params(vit) == 85_798_656
    assert n_params(densenet) == 7_978_856  # torchvision's DenseNet-121
    assert n_params(resnet) == 11_689_512  # torchvision's ResNet-18
    assert fusion.num_features == 1280
    assert len(vit.blocks) == 12 and vit.patch_embed.num_patches == 196 and vit.global_pool == "avg"


def test_vit_pools_by_mean_over_patch_tokens():
    model = create_model("vit_tiny", num_classes=0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model(x)
    assert tokens.shape == (1, 197, 192)  # class token + 196 patches
    torch.testing.assert_close(pooled, model.fc_norm(tokens[:, 1:].mean(dim=1)))


@pytest.mark.parametrize(
    ("name", "kwargs", "side"),
    [
        ("resnet18", {}, 64),
        ("googlenet", {}, 64),
        ("densenet121_se", {}, 64),
        ("efficientnet_lite0", {}, 64),
        ("fusion", {"cnn": "resnet18", "vit": "vit_tiny"}, 224),
    ],
)
def test_every_trainable_parameter_receives_a_gradient(name, kwargs, side):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, **kwargs).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, side, side)), torch.tensor([0, 2]))
    loss.backward()
    dead = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert dead == []


def test_fusion_branches_and_renormalisation():
    model = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny")
    # Input normalised for the CNN (ImageNet); the ViT's weights expect mean = std = 0.5.
    assert data_config(model)["mean"] == IMAGENET[0]
    assert data_config(model.vit)["mean"] == HALF[0]
    raw = torch.rand(2, 3, 8, 8)
    imagenet_normalised = (raw - torch.tensor(IMAGENET[0]).view(3, 1, 1)) / torch.tensor(IMAGENET[1]).view(
        3, 1, 1
    )
    torch.testing.assert_close(model.vit_input(imagenet_normalised), (raw - 0.5) / 0.5)
    assert model.model_kwargs == {
        "cnn": "resnet18",
        "vit": "vit_tiny",
        "head_hidden": (512, 256),
        "head_drop": 0.3,
        "seg_head": False,
    }
    assert [type(m) for m in model.head if isinstance(m, nn.Linear)] == [nn.Linear] * 3


def test_renormalize_is_identity_when_normalisations_agree():
    x = torch.randn(1, 3, 4, 4)
    assert Renormalize(IMAGENET, IMAGENET)(x) is x


def test_fusion_accepts_any_timm_cnn():
    model = create_model("fusion", num_classes=2, cnn="mobilenetv3_small_050", vit="vit_tiny").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 2)
    assert model.num_features == model.cnn.head_hidden_size + 192  # MobileNetV3: 1024, not 576


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(BreastvisionError, match="unknown model 'resnet19'.*did you mean resnet18"):
        create_model("resnet19", num_classes=3)


def test_unknown_timm_branch_is_a_clear_error():
    with pytest.raises(BreastvisionError, match="timm has no model 'no_such_cnn'"):
        create_model("fusion", num_classes=3, cnn="no_such_cnn", vit="vit_tiny")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(BreastvisionError, match="bad arguments for model 'resnet18'"):
        create_model("resnet18", num_classes=3, depth=50)
    with pytest.raises(BreastvisionError, match="num_classes"):
        create_model("resnet18", num_classes=-1)
