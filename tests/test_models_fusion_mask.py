"""The fusion's auxiliary mask head: training-only, classification unchanged with or without it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.registry import create_model
from breastvision.models.staging import split_model
from breastvision.models.weights import RANDOM_INIT
from breastvision.training.freezing import freeze_before
from breastvision.training.segmentation import mask_loss

SIDE = 224


def _fusion(cnn: str = "resnet18", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("fusion", num_classes=3, cnn=cnn, vit="vit_tiny", **kwargs).eval()


@pytest.mark.parametrize("cnn", ["resnet18", "densenet121", "efficientnet_lite0"])
def test_mask_head_shapes_and_unchanged_classification(cnn):
    plain, masked = _fusion(cnn), _fusion(cnn, seg_head=True)
    x = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        logits, mask_logits = masked.forward_with_mask(x)
        torch.testing.assert_close(masked(x), plain(x), rtol=0, atol=0)  # the head draws after the rest
        torch.testing.assert_close(logits, masked(x), rtol=0, atol=0)
    assert logits.shape == (2, 3) and mask_logits.shape == (2, 1, SIDE, SIDE)
    assert masked.model_kwargs["seg_head"] is True and masked.weights_origin["seg_head"] == RANDOM_INIT
    assert "seg_head" not in plain.weights_origin


def test_prediction_needs_no_head():
    masked = _fusion(seg_head=True)
    state = {k: v for k, v in masked.state_dict().items() if not k.startswith("seg_head.")}
    plain = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny").eval()
    plain.load_state_dict(state)  # strict: the head is the only difference
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), masked(x), rtol=0, atol=0)
    with pytest.raises(BreastvisionError, match="no mask head"):
        plain.forward_with_mask(x)
    prefix, suffix = split_model(plain, "cnn.layer4,vit.block12")
    with torch.no_grad(), pytest.raises(BreastvisionError, match="no mask head"):
        suffix.forward_with_mask(prefix(x))


def test_a_fusion_file_without_the_head_seeds_one_with_it(tmp_path):
    path = tmp_path / "fusion.safetensors"
    save_file(_fusion().state_dict(), str(path))
    kwargs = {"cnn": "resnet18", "vit": "vit_tiny", "seg_head": True}
    model = create_model("fusion", num_classes=3, pretrained=str(path), **kwargs)
    assert model.weights_origin["seg_head"] == RANDOM_INIT
    assert model.weights_origin["cnn"].startswith("file: ")


def test_a_fusion_file_with_the_head_seeds_one_without_it(tmp_path):
    masked = _fusion(seg_head=True)
    path = tmp_path / "masked.safetensors"
    save_file(masked.state_dict(), str(path))
    plain = create_model("fusion", num_classes=3, pretrained=str(path), cnn="resnet18", vit="vit_tiny").eval()
    assert plain.seg_head is None and "seg_head" not in plain.weights_origin
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), masked(x), rtol=0, atol=0)


def test_split_suffix_gives_the_same_mask_and_trains_the_cnn_through_it():
    model = _fusion(seg_head=True)
    x = torch.randn(2, 3, SIDE, SIDE)
    prefix, suffix = freeze_before(model, "cnn.layer4,vit.block12")
    with torch.no_grad():
        whole = model.forward_with_mask(x)
        split = suffix.forward_with_mask(prefix(x))
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert {id(p) for p in model.seg_head.parameters()} <= {id(p) for p in suffix.parameters()}
    model.train()
    target = torch.zeros(2, 1, SIDE, SIDE, dtype=torch.bool)
    target[:, :, 50:100, 60:120] = True
    mask_loss(suffix.forward_with_mask(prefix(x))[1], target).backward()
    assert model.seg_head.conv.weight.grad.abs().sum() > 0
    assert model.cnn.layer4[1].conv2.weight.grad.abs().sum() > 0  # the shared CNN features learn from masks
    assert model.vit.blocks[11].attn.qkv.weight.grad is None  # the ViT branch does not feed the mask


def test_mask_head_errors():
    model = _fusion(seg_head=True)
    x = torch.randn(1, 3, SIDE, SIDE)
    prefix, suffix = split_model(model, "cnn.head,vit.block12")  # the CNN's feature map is in the prefix
    with torch.no_grad(), pytest.raises(BreastvisionError, match="make the CNN branch's last block"):
        suffix.forward_with_mask(prefix(x))
    with pytest.raises(BreastvisionError, match="a mask head needs a CNN branch of a known family"):
        create_model("fusion", num_classes=2, cnn="mobilenetv3_small_050", vit="vit_tiny", seg_head=True)


def test_a_model_file_with_the_head_predicts_without_a_mask(make_model_file):
    from breastvision.models.bundle import ModelBundle

    path = make_model_file("fusion", input_size=224, cnn="resnet18", vit="vit_tiny", seg_head=True)
    model = ModelBundle.load(path).build_model()
    assert model.seg_head is not None  # rebuilt from the file's model_kwargs, weights included
    x = torch.randn(1, 3, SIDE, SIDE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _fusion(seg_head=True)(x), rtol=0, atol=0)
