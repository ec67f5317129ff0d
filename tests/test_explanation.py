"""Grad-CAM: target layers per architecture, ViT token grids, fusion branches, overlays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam.utils.image import scale_cam_image
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.explanation.gradcam import (
    default_target_layers,
    explain,
    input_region,
    overlay,
    resolve_module,
    save_overlays,
    token_reshape,
)
from breastvision.models.bundle import Preprocessing
from breastvision.models.registry import create_model


class TwoColours(nn.Module):
    """Class 0 is "how red", class 1 "how green": Grad-CAM must find where the colour is."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 2, 1, bias=False), nn.ReLU())
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.features[0].weight.zero_()
            self.features[0].weight[0, 0] = 1.0
            self.features[0].weight[1, 1] = 1.0
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _red_and_green(size: int = 32) -> torch.Tensor:
    x = torch.zeros(3, size, size)
    half = size // 2
    x[0, :half, :half] = 1.0  # red, top-left
    x[1, half:, half:] = 0.5  # green (weaker), bottom-right
    return x


TOP_LEFT, BOTTOM_RIGHT = (slice(0, 16), slice(0, 16)), (slice(16, 32), slice(16, 32))


@pytest.mark.parametrize(("target", "quadrant"), [(0, TOP_LEFT), (1, BOTTOM_RIGHT)])
def test_heatmap_finds_the_evidence_for_the_target_class(target: int, quadrant: tuple[slice, slice]) -> None:
    result = explain(TwoColours().eval(), _red_and_green(), target=target, target_layers=["features"])
    heat = result.primary
    inside = heat[quadrant].mean()
    outside = (heat.sum() - heat[quadrant].sum()) / (heat.size - heat[quadrant].size)
    assert result.target == target
    assert inside > 0.8 and outside < 0.2


def test_default_target_is_the_predicted_class() -> None:
    result = explain(TwoColours().eval(), _red_and_green(), target_layers=["features"])
    assert result.target == 0  # red covers as much area as green at twice the intensity
    assert result.probabilities.argmax() == 0
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("architecture", "kwargs", "expected"),
    [
        ("resnet18", {}, {"gradcam": ["layer4"]}),
        ("densenet121_se", {}, {"gradcam": ["features.denseblock4"]}),
        ("googlenet", {}, {"gradcam": ["inception5b"]}),
        ("vit", {"variant": "test_vit"}, {"gradcam": ["blocks.-1.norm1"]}),
        ("fusion", {"vit": "test_vit"}, {"cnn": ["cnn.layer4"], "vit": ["vit.blocks.-1.norm1"]}),
        ("fusion", {"cnn": "densenet121", "vit": "test_vit"},
         {"cnn": ["cnn.features.denseblock4"], "vit": ["vit.blocks.-1.norm1"]}),
    ],
)
def test_default_layers_follow_the_architecture(architecture: str, kwargs: dict, expected: dict) -> None:
    model = create_model(architecture, num_classes=3, **kwargs)
    assert default_target_layers(model, architecture) == expected
    for paths in expected.values():
        resolve_module(model, paths[0])


def test_negative_indices_and_bad_layer_names() -> None:
    model = create_model("vit", num_classes=3, variant="test_vit")
    assert resolve_module(model, "blocks.-1.norm1") is model.blocks[len(model.blocks) - 1].norm1
    with pytest.raises(BreastvisionError, match="no sub-module 'layer9'"):
        resolve_module(model, "layer9")
    with pytest.raises(BreastvisionError, match="out of range"):
        resolve_module(model, "blocks.99")


def test_token_reshape_drops_prefix_tokens_and_keeps_patch_order() -> None:
    class FakeVit(nn.Module):
        num_prefix_tokens = 1

        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Identity()
            self.patch_embed.grid_size = (2, 3)

    tokens = torch.arange(7, dtype=torch.float32).view(1, 7, 1).expand(1, 7, 4)
    grid = token_reshape(FakeVit())(tokens)
    assert grid.shape == (1, 4, 2, 3)
    assert torch.equal(grid[0, 0], torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))


def test_vit_heatmap_covers_the_input() -> None:
    model = create_model("vit", num_classes=3, variant="test_vit").eval()
    torch.manual_seed(0)
    result = explain(model, torch.randn(3, 160, 160), architecture="vit")
    heat = result.primary
    assert heat.shape == (160, 160)
    assert 0.0 <= heat.min() and heat.max() <= 1.0 and heat.std() > 0.01


def test_fusion_gives_one_map_per_branch_and_their_mean() -> None:
    model = create_model("fusion", num_classes=3, vit="test_vit").eval()
    torch.manual_seed(0)
    result = explain(model, torch.randn(3, 160, 160), architecture="fusion")
    assert list(result.heatmaps) == ["combined", "cnn", "vit"]
    mean = (np.maximum(result.heatmaps["cnn"], 0) + np.maximum(result.heatmaps["vit"], 0)) / 2
    np.testing.assert_allclose(result.heatmaps["combined"], scale_cam_image(mean[None])[0], atol=1e-6)
    # Grad-CAM's hooks are removed again: the model can be shared after explaining.
    assert not any(m._forward_hooks for m in model.modules())


def test_explain_refuses_misuse() -> None:
    model = TwoColours().eval()
    with pytest.raises(BreastvisionError, match="unknown explanation method"):
        explain(model, _red_and_green(), method="magic", target_layers=["features"])
    with pytest.raises(BreastvisionError, match="one image"):
        explain(model, torch.stack([_red_and_green()] * 2), target_layers=["features"])
    with torch.inference_mode(), pytest.raises(BreastvisionError, match="inference_mode"):
        explain(model, _red_and_green(), target_layers=["features"])
    with pytest.raises(BreastvisionError, match="no default Grad-CAM layer"):
        explain(model, _red_and_green(), architecture="mystery")


def test_overlay_is_drawn_on_the_region_the_model_saw(tmp_path) -> None:
    pre = Preprocessing(input_size=64, resize=80)
    assert input_region((200, 100), pre) == pytest.approx((20.0, 10.0, 180.0, 90.0))
    image = Image.new("RGB", (200, 100), (40, 40, 40))
    drawn = np.asarray(overlay(image, np.ones((64, 64), np.float32), pre)).astype(int)
    original = np.asarray(image).astype(int)
    assert drawn.shape == original.shape
    outside = np.ones(drawn.shape[:2], bool)
    outside[10:90, 20:180] = False
    assert np.array_equal(drawn[outside], original[outside])
    assert np.abs(drawn[12:88, 22:178] - original[12:88, 22:178]).mean() > 50


def test_save_overlays_writes_one_png_per_map(tmp_path) -> None:
    model = create_model("fusion", num_classes=3, vit="test_vit").eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 150, 3), dtype=np.uint8))
    tensor = torch.from_numpy(np.asarray(image.resize((160, 160)), np.float32) / 255).permute(2, 0, 1)
    result = explain(model, tensor, architecture="fusion", target=2)
    paths = save_overlays(image, result, Preprocessing(input_size=160), tmp_path, "scan")
    assert sorted(p.name for p in paths.values()) == ["scan_cnn.png", "scan_combined.png", "scan_vit.png"]
    assert all(Image.open(p).size == (150, 120) for p in paths.values())
    assert result.target == 2
