"""The mild augmentation presets for cached views (ultrasound, histology) and HED stain jitter."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from breastvision.data.hed import hed_jitter, hed_to_rgb, rgb_to_hed
from breastvision.data.transforms import (
    DIHEDRAL_8,
    HedJitter,
    RandomDihedral,
    apply_view,
    augmented_view,
    eval_transform,
    train_transform,
)
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing
from test_transforms import _image


def _kinds(transform: v2.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


@pytest.mark.parametrize("name", ["ultrasound_mild", "histology_mild"])
@pytest.mark.parametrize("resize", [None, 40])
def test_mild_presets_are_seeded_draws(name: str, resize: int | None) -> None:
    transform = train_transform(name, Preprocessing(input_size=32, resize=resize))
    image = _image(50, 70)
    draw = augmented_view(transform, image, 7)
    assert draw.shape == (3, 32, 32) and draw.dtype == torch.float32
    assert torch.equal(draw, augmented_view(transform, image, 7))
    others = [augmented_view(transform, image, seed) for seed in (1, 2, 3)]
    assert all(not torch.equal(draw, other) for other in others)
    # Mild: on a smooth image a draw stays nearer the evaluated image (up to a flip or quarter turn)
    # than another image is.
    evaluate = eval_transform(Preprocessing(input_size=32, resize=resize))
    smooth, other = _smooth(0), _smooth(1)
    draw = augmented_view(transform, smooth, 7)
    near = min((draw - apply_view(evaluate(smooth), view)).abs().mean() for view in DIHEDRAL_8)
    assert near < (evaluate(other) - evaluate(smooth)).abs().mean() / 2


def _smooth(seed: int) -> Image.Image:
    return _image(4, 5, seed).resize((70, 50), Image.Resampling.BILINEAR)


def test_ultrasound_mild_has_no_vertical_flip_and_is_the_eval_transform_at_zero() -> None:
    pre = Preprocessing(input_size=32, resize=40)
    transform = train_transform("ultrasound_mild", pre)
    assert _kinds(transform) == [
        "ToImage", "Resize", "RandomHorizontalFlip", "RandomAffine", "CenterCrop", "ColorJitter", "ToDtype",
        "Normalize",
    ]  # fmt: skip
    affine = transform.transforms[3]
    assert affine.degrees == [-10.0, 10.0] and affine.scale == (0.9, 1.1) and affine.translate == (0.05, 0.05)
    assert transform.transforms[5].brightness == transform.transforms[5].contrast == (0.9, 1.1)
    still = train_transform(
        {"name": "ultrasound_mild", "flip_p": 0, "degrees": 0, "scale": (1, 1), "translate": 0,
         "brightness": 0, "contrast": 0},
        pre,
    )  # fmt: skip
    image = _image(50, 70)
    torch.testing.assert_close(augmented_view(still, image, 3), eval_transform(pre)(image))


def test_histology_mild_is_the_eval_transform_at_zero() -> None:
    pre = Preprocessing(input_size=32)
    assert _kinds(train_transform("histology_mild", pre)) == [
        "ToImage", "Resize", "RandomDihedral", "RandomResizedCrop", "ToDtype", "HedJitter", "Normalize",
    ]  # fmt: skip
    zero = {"dihedral": False, "crop_scale": (1, 1), "hed_sigma": 0, "hed_bias": 0}
    still = train_transform({"name": "histology_mild", **zero}, pre)
    image = _image(50, 70)
    torch.testing.assert_close(augmented_view(still, image, 3), eval_transform(pre)(image), atol=1e-5, rtol=0)
    with pytest.raises(BreastvisionError, match="bad parameters for augmentation 'histology_mild'"):
        train_transform({"name": "histology_mild", "hed_alpha": 0.1}, pre)


def test_random_dihedral_draws_every_view_and_moves_the_mask_with_the_image() -> None:
    image = tv_tensors.Image(torch.randint(0, 256, (3, 12, 12), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 2, (1, 12, 12), dtype=torch.uint8))
    plain = image.as_subclass(torch.Tensor)
    seen = set()
    for seed in range(64):
        out_image, out_mask = augmented_view(RandomDihedral(), (image, mask), seed)
        (name,) = [n for n in DIHEDRAL_8 if torch.equal(out_image, apply_view(plain, n))]
        assert isinstance(out_mask, tv_tensors.Mask)
        assert torch.equal(out_mask, apply_view(mask.as_subclass(torch.Tensor), name))
        seen.add(name)
    assert seen == set(DIHEDRAL_8)


def test_hed_matches_scikit_image_and_round_trips() -> None:
    skimage_color = pytest.importorskip("skimage.color")
    rgb = torch.rand(3, 16, 16, dtype=torch.float64) * 0.9 + 0.05
    ours = rgb_to_hed(rgb)
    theirs = torch.from_numpy(skimage_color.rgb2hed(rgb.permute(1, 2, 0).numpy())).permute(2, 0, 1)
    torch.testing.assert_close(ours.clamp_min(0), theirs, atol=1e-9, rtol=0)  # scikit-image clips at 0
    torch.testing.assert_close(hed_to_rgb(ours), rgb, atol=1e-12, rtol=0)


def test_hed_jitter_is_the_identity_at_zero_and_changes_stain_amounts_otherwise() -> None:
    rgb = torch.rand(3, 16, 16)
    torch.testing.assert_close(hed_jitter(rgb, torch.ones(3), torch.zeros(3)), rgb, atol=1e-6, rtol=0)
    more_eosin = hed_jitter(rgb, torch.tensor([1.0, 1.2, 1.0]), torch.zeros(3))
    gained = rgb_to_hed(more_eosin.double()) - rgb_to_hed(rgb.double())
    eosin = rgb_to_hed(rgb.double())[1]
    unclipped = (more_eosin > 0) & (more_eosin < 1)
    keep = unclipped.all(0)
    torch.testing.assert_close(gained[1][keep], 0.2 * eosin[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(gained[0][keep], torch.zeros_like(gained[0][keep]), atol=1e-5, rtol=0)


def test_hed_jitter_transform_is_seeded_and_leaves_masks_alone() -> None:
    image = tv_tensors.Image(torch.rand(3, 8, 8))
    mask = tv_tensors.Mask(torch.ones(1, 8, 8, dtype=torch.uint8))
    jitter = HedJitter(sigma=0.05, bias=0.01)
    a, a_mask = augmented_view(jitter, (image, mask), 1)
    b, _ = augmented_view(jitter, (image, mask), 1)
    c, _ = augmented_view(jitter, (image, mask), 2)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, image)
    assert isinstance(a, tv_tensors.Image) and torch.equal(a_mask, mask)
    torch.testing.assert_close(HedJitter(0, 0)(image), image, atol=1e-6, rtol=0)
    with pytest.raises(BreastvisionError, match="float RGB"):
        jitter(tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8)))
