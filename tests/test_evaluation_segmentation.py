"""Dice of the mask head on hand-checked cases, and the auxiliary mask loss."""

from __future__ import annotations

import math

import pytest
import torch

from breastvision.evaluation.segmentation import dice_per_image, dice_summary, pool_dice
from breastvision.training.segmentation import mask_loss


def _masks(*grids: list[list[int]]) -> torch.Tensor:
    return torch.tensor(grids, dtype=torch.bool).unsqueeze(1)


def test_dice_on_hand_cases():
    pred = _masks([[1, 1], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]])
    target = _masks([[1, 0], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]], [[0, 1], [0, 0]], [[0, 0], [0, 0]])
    # 2·1/(2+1); perfect; both empty (a normal image left empty); lesion missed; lesion painted on normal
    expected = torch.tensor([2 / 3, 1.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(dice_per_image(pred, target), expected)


def test_dice_summary_thresholds_logits_and_separates_lesion_images():
    logits = torch.tensor([[[[3.0, -1.0], [-2.0, -5.0]]], [[[-4.0, -4.0], [-4.0, -4.0]]]])
    target = _masks([[1, 1], [0, 0]], [[0, 0], [0, 0]])
    summary = dice_summary(logits, target)
    assert summary == {"dice": pytest.approx((2 / 3 + 1) / 2), "dice_lesion": pytest.approx(2 / 3),
                       "images": 2, "lesion_images": 1}  # fmt: skip
    assert math.isnan(dice_summary(logits, torch.zeros_like(target))["dice_lesion"])


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="B×1×H×W"):
        dice_per_image(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_mask_loss_prefers_the_right_mask():
    target = _masks([[1, 1], [0, 0]], [[0, 0], [0, 0]])
    right = torch.where(target, 8.0, -8.0)
    assert mask_loss(right, target) < 0.01
    assert mask_loss(-right, target) > 1.5
    logits = torch.zeros(2, 1, 2, 2, requires_grad=True)
    mask_loss(logits, target).backward()
    # Gradient pushes lesion pixels up and background pixels down.
    assert (logits.grad[target] < 0).all() and (logits.grad[~target] > 0).all()


def test_pooled_dice_is_the_dice_of_all_images_at_once():
    torch.manual_seed(0)
    logits = torch.randn(7, 1, 6, 6)
    target = torch.rand(7, 1, 6, 6) > 0.6
    target[4:6] = False  # normal images, one fold without any lesion image
    folds = [slice(0, 3), slice(3, 4), slice(4, 6), slice(6, 7)]
    pooled = pool_dice([dice_summary(logits[f], target[f]) for f in folds])
    whole = dice_summary(logits, target)
    assert pooled["images"] == whole["images"] == 7 and pooled["lesion_images"] == whole["lesion_images"] == 5
    assert pooled["dice"] == pytest.approx(whole["dice"])
    assert pooled["dice_lesion"] == pytest.approx(whole["dice_lesion"])
