"""Dihedral views and TTA, System U's augmentation, the shared eval path with stain normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from breastvision.data.stain import ReinhardNormalizer
from breastvision.data.transforms import (
    DIHEDRAL_5,
    DIHEDRAL_8,
    apply_view,
    augmented_view,
    eval_transform,
    preprocess_image,
    train_transform,
    view_logits,
)
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def _image(height: int = 30, width: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_view_names_and_hand_computed_views() -> None:
    assert DIHEDRAL_5 == ("rot90", "rot180", "rot270", "hflip", "vflip")
    assert set(DIHEDRAL_8) == {*DIHEDRAL_5, "identity", "transpose", "antitranspose"}
    t = torch.tensor([[1, 2, 3], [4, 5, 6]])
    # Counter-clockwise: the top-right corner comes to the top-left.
    assert apply_view(t, "rot90").tolist() == [[3, 6], [2, 5], [1, 4]]
    assert apply_view(t, "rot180").tolist() == [[6, 5, 4], [3, 2, 1]]
    assert apply_view(t, "rot270").tolist() == [[4, 1], [5, 2], [6, 3]]
    assert apply_view(t, "hflip").tolist() == [[3, 2, 1], [6, 5, 4]]
    assert apply_view(t, "vflip").tolist() == [[4, 5, 6], [1, 2, 3]]
    assert apply_view(t, "transpose").tolist() == [[1, 4], [2, 5], [3, 6]]
    assert apply_view(t, "antitranspose").tolist() == [[6, 3], [5, 2], [4, 1]]
    with pytest.raises(BreastvisionError, match="unknown image view 'rot45'"):
        apply_view(t, "rot45")


def test_pil_and_tensor_views_agree_and_are_distinct() -> None:
    image = _image()
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    seen = []
    for name in DIHEDRAL_8:
        from_pil = torch.from_numpy(np.array(apply_view(image, name))).permute(2, 0, 1)
        assert torch.equal(from_pil, apply_view(tensor, name)), name
        seen.append(from_pil)
    square = [apply_view(tensor[:, :30, :30], name) for name in DIHEDRAL_8]
    assert all(not torch.equal(a, b) for i, a in enumerate(square) for b in square[i + 1 :])


def test_tta_average_is_invariant_under_the_group() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    x = torch.randn(2, 3, 8, 8)
    assert not torch.allclose(model(x), model(apply_view(x, "rot90")))

    def tta(batch: torch.Tensor, views: tuple[str, ...] = DIHEDRAL_8) -> torch.Tensor:
        return torch.softmax(view_logits(model, batch, views), 2).mean(0)

    probs = tta(x)
    assert view_logits(model, x).shape == (8, 2, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    for name in ("rot90", "hflip", "antitranspose"):
        torch.testing.assert_close(tta(apply_view(x, name)), probs)
    assert not torch.allclose(tta(x, ("identity",)), probs)


def test_eval_transform_sizes_and_normalisation() -> None:
    grey = Image.new("RGB", (60, 40), (128, 128, 128))
    out = eval_transform(Preprocessing(input_size=32))(grey)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 16, 16], expected)
    assert eval_transform({"input_size": 24, "resize": 28})(_image()).shape == (3, 24, 24)
    with pytest.raises(BreastvisionError, match="smaller than the input size"):
        eval_transform({"input_size": 32, "resize": 16})
    with pytest.raises(BreastvisionError, match="input_sz: unknown key"):
        eval_transform({"input_sz": 32})


def test_busi_paper_augmentation_follows_the_paper() -> None:
    pre = Preprocessing(input_size=32, resize=40)
    transform = train_transform("busi_paper", pre)
    kinds = [type(t).__name__ for t in transform.transforms]
    assert kinds == [
        "ToImage", "Resize", "RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip",
        "RandomRotation", "ColorJitter", "RandomAffine", "ToDtype", "Normalize",
    ]  # fmt: skip
    steps = transform.transforms
    assert steps[1].size == [40, 40] and steps[2].size == (32, 32)
    assert steps[3].p == steps[4].p == 0.5 and steps[5].degrees == [-15.0, 15.0]
    assert steps[6].brightness == steps[6].contrast == steps[6].saturation == (0.8, 1.2)
    assert steps[6].hue == (-0.1, 0.1) and steps[7].translate == (0.1, 0.1)

    image = _image(50, 70)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert not torch.equal(augmented_view(transform, image, 1), augmented_view(transform, image, 2))
    torch.testing.assert_close(augmented_view(transform, image, 7), augmented_view(transform, image, 7))

    still = train_transform(
        {"name": "busi_paper", "crop_scale": (1, 1), "flip_p": 0, "degrees": 0, "brightness": 0,
         "contrast": 0, "saturation": 0, "hue": 0, "translate": 0},
        pre,
    )  # fmt: skip
    grey = Image.new("RGB", (50, 50), (200, 100, 50))
    torch.testing.assert_close(still(grey), eval_transform(pre)(grey))


def test_train_transform_by_name_and_errors() -> None:
    pre = Preprocessing(input_size=16)
    image = _image()
    assert torch.equal(train_transform(None, pre)(image), eval_transform(pre)(image))
    assert isinstance(train_transform({"name": "none"}, pre), v2.Compose)
    with pytest.raises(BreastvisionError, match="unknown augmentation 'mixup'"):
        train_transform("mixup", pre)
    with pytest.raises(BreastvisionError, match="bad parameters for augmentation 'busi_paper'"):
        train_transform({"name": "busi_paper", "degress": 10}, pre)


def test_preprocess_image_applies_the_saved_stain_normaliser() -> None:
    image = _image(32, 32, seed=1)
    reference = _image(32, 32, seed=2).point(lambda v: v // 2 + 60)
    norm = ReinhardNormalizer(min_tissue_fraction=0).fit(reference)
    plain = Preprocessing(input_size=16)
    stained = Preprocessing(input_size=16, stain=norm.state_dict())
    torch.testing.assert_close(preprocess_image(image, plain), eval_transform(plain)(image))
    expected = eval_transform(plain)(norm.transform(image))
    torch.testing.assert_close(preprocess_image(image, stained), expected)
    assert not torch.allclose(expected, eval_transform(plain)(image))
    from_dict = {"input_size": 16, "stain": norm.state_dict()}
    torch.testing.assert_close(preprocess_image(image, from_dict), expected)
