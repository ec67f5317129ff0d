"""Lesion-mask targets: union of an image's masks, empty for normal, through the image's geometry."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from breastvision.data import transforms
from breastvision.data.io import load_image, load_mask
from breastvision.data.masks import mask_target, union_mask, with_mask
from breastvision.data.records import Record
from breastvision.models.bundle import Preprocessing
from breastvision.training.config import ViewConfig
from breastvision.training.views import Item, ViewDataset, ViewRenderer

PRE = Preprocessing(input_size=224, resize=256)
#: Unnormalised pixels, so an image painted with its mask can be thresholded at one half.
RAW = Preprocessing(input_size=224, resize=256, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _record(folder: Path, stem: str, n_masks: int) -> Record:
    masks = tuple(folder / f"{stem}_mask{'' if i == 0 else f'_{i}'}.png" for i in range(n_masks))
    return Record(folder / f"{stem}.png", 1, stem, masks=masks)


@pytest.fixture
def two_lesions(busi_dir: Path) -> Record:
    """``benign (100)``: two mask files, two lesions."""
    return _record(busi_dir / "benign", "benign (100)", 2)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_union_of_two_masks(two_lesions: Record) -> None:
    first, second = (np.asarray(load_mask(p)) > 0 for p in two_lesions.masks)
    union = np.asarray(union_mask(two_lesions)) > 0
    assert np.array_equal(union, first | second)
    assert union.sum() > first.sum() and union.sum() > second.sum()  # each mask adds a lesion


def test_normal_images_have_an_empty_target(busi_dir: Path) -> None:
    with_file = _record(busi_dir / "normal", "normal (100)", 1)  # BUSI's normal masks are black
    without = _record(busi_dir / "normal", "normal (100)", 0)
    for record in (with_file, without):
        target = mask_target(record, PRE)
        assert target.shape == (1, 224, 224) and target.dtype == torch.bool and not target.any()


def test_target_has_the_model_input_size(two_lesions: Record) -> None:
    image = transforms.preprocess_image(load_image(two_lesions.path), PRE)
    target = mask_target(two_lesions, PRE)
    assert target.shape == (1, *image.shape[-2:])
    assert 0 < target.float().mean() < 0.5


def _painted(record: Record) -> Image.Image:
    """An image that is white exactly on its lesions: its transformed pixels show where the mask
    should be."""
    return union_mask(record).convert("RGB")


@pytest.mark.parametrize("view", ["identity", "hflip", "rot90", "transpose"])
def test_dihedral_views_keep_image_and_mask_aligned(two_lesions: Record, view: str) -> None:
    image = transforms.preprocess_image(transforms.apply_view(_painted(two_lesions), view), RAW)
    target = mask_target(two_lesions, RAW, view)
    assert _iou(image[0] > 0.5, target[0]) > 0.95  # bilinear vs nearest differ only at edges
    if view != "identity":
        assert _iou(target, mask_target(two_lesions, RAW)) < 0.9  # the view did move the lesions


def test_random_draws_move_image_and_mask_together(two_lesions: Record) -> None:
    augment = transforms.train_transform({"name": "busi_paper", "crop_scale": (0.5, 1.0), "hue": 0.0}, RAW)
    painted, mask = _painted(two_lesions), union_mask(two_lesions)
    for seed in range(4):
        image, target = with_mask(partial(transforms.augmented_view, augment, seed=seed), painted, mask)
        alone = transforms.augmented_view(augment, painted, seed)
        assert torch.equal(image, alone)  # the mask does not change the image's draw
        assert target.shape == (1, 224, 224) and target.any()
        # Colour jitter scales the white lesion but keeps it far brighter than the black rest; the
        # small lesions' rotated, bilinear edges are what keeps the overlap from being perfect.
        lesion = image.mean(0) > 0.3
        assert _iou(lesion, target[0]) > 0.8
        assert _iou(lesion, target[0].flip(-1)) < 0.5  # a misaligned mask would fail


def test_renderer_gives_the_same_tensor_with_its_mask(two_lesions: Record) -> None:
    renderer = ViewRenderer(ViewConfig(kind="random", count=2, seed=3, augment="busi_paper"), PRE)
    items = [Item(two_lesions, "benign/benign (100).png", view, 1) for view in ("aug0", "aug1")]
    dataset = ViewDataset(items, renderer, masks=True)
    for index, item in enumerate(items):
        tensor, label, got_index, target = dataset[index]
        assert torch.equal(tensor, renderer(item)) and (label, got_index) == (1, index)
        assert target.shape == (1, 224, 224) and target.dtype == torch.bool
    assert not torch.equal(dataset[0][3], dataset[1][3])  # two draws, two geometries
    images, labels, _, masks = next(iter(DataLoader(dataset, batch_size=2)))
    assert images.shape == (2, 3, 224, 224) and masks.shape == (2, 1, 224, 224) and masks.dtype == torch.bool


def test_with_mask_on_a_generated_image() -> None:
    lesion = np.zeros((32, 64), np.uint8)  # H×W
    lesion[:16, :16] = 255
    image = Image.new("RGB", (64, 32), "white")
    transform = transforms.eval_transform(Preprocessing(input_size=16))
    tensor, target = with_mask(transform, image, Image.fromarray(lesion))
    assert tensor.shape == (3, 16, 16) and target.shape == (1, 16, 16)
    # 64×32 squeezed to 16×16 (nearest-neighbour): the 16×16 top-left lesion becomes 4 wide, 8 high.
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[:8, :4] = True
    assert torch.equal(target[0], expected)


@pytest.mark.parametrize("fresh", [False, True])
def test_a_mask_rendered_alone_is_the_mask_rendered_with_its_image(two_lesions: Record, fresh: bool) -> None:
    """Mask-guided training on cached features renders the masks without the images: the same draw
    (colour jitter consumes random numbers too), the same dihedral view, the same geometry."""
    config = ViewConfig(kind="random", count=3, seed=5, augment="busi_paper", fresh_each_epoch=fresh)
    renderer = ViewRenderer(config, PRE)
    masks = []
    for view in ("aug0", "aug1", "aug2", "identity", "rot90", "transpose"):
        item = Item(two_lesions, "benign/benign (100).png", view, 1)
        alone = renderer.render_mask(item, epoch=3)
        assert torch.equal(alone, renderer.render_with_mask(item, epoch=3)[1]), view
        masks.append(alone)
    assert all(not torch.equal(a, b) for a, b in zip(masks, masks[1:], strict=False))  # six geometries
