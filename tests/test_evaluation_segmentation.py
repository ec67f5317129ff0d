"""Dice of the mask head on hand-checked cases, and the auxiliary mask loss."""

from __future__ import annotations

import math

import pytest
import torch

from breastvision.evaluation.segmentation import dice_per_image, dice_summary
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
