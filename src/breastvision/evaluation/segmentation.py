"""Dice of the auxiliary lesion-mask head on test images (mask-guided BUSI training).

Per image, torchmetrics' Dice (``2|P∩T| / (|P|+|T|)``) of the thresholded mask logits against the
target. An image whose target and prediction are both empty (a ``normal`` image left empty) scores
1 rather than torchmetrics' NaN: it is a correct answer, and dropping it would hide a head that
paints lesions onto normal images. The summary also gives the mean over lesion images alone, the
number comparable with segmentation papers, which leave normal images out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchmetrics.functional.segmentation import dice_score as _torchmetrics_dice


def dice_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of each image of two B×1×H×W binary masks (bool or 0/1); 1 where both are empty."""
    if pred.shape != target.shape or pred.dim() != 4 or pred.shape[1] != 1:
        raise ValueError(f"expected two B×1×H×W masks, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.bool(), target.bool()
    scores = _torchmetrics_dice(pred.long(), target.long(), num_classes=1, average="none").squeeze(1)
    both_empty = ~(pred | target).flatten(1).any(dim=1)
    return torch.where(both_empty, torch.ones_like(scores), scores)


def dice_summary(mask_logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> dict[str, Any]:
    """``dice`` over all images and ``dice_lesion`` over images whose target has a lesion (NaN when
    none has); a pixel is predicted lesion where its logit exceeds ``threshold`` (0: probability ½)."""
    return summarize_dice(mask_logits > threshold, target)


def summarize_dice(pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """:func:`dice_summary` of binary predicted masks."""
    scores = dice_per_image(pred, target)
    lesion = target.bool().flatten(1).any(dim=1)
    return {
        "dice": float(scores.mean()),
        "dice_lesion": float(scores[lesion].mean()) if lesion.any() else float("nan"),
        "images": int(scores.numel()),
        "lesion_images": int(lesion.sum()),
    }


def pool_dice(summaries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary of the union of disjoint image sets (cross-validation folds) from theirs: the
    means weighted by their image counts, as if every image had been scored at once."""
    images = sum(int(s["images"]) for s in summaries)
    lesion_images = sum(int(s["lesion_images"]) for s in summaries)
    dice = sum(s["dice"] * s["images"] for s in summaries) / images
    # A set without lesion images has a NaN dice_lesion and adds nothing to the lesion mean.
    dice_lesion = (sum(s["dice_lesion"] * s["lesion_images"] for s in summaries if s["lesion_images"])
                   / lesion_images if lesion_images else float("nan"))
    return {"dice": float(dice), "dice_lesion": float(dice_lesion), "images": images,
            "lesion_images": lesion_images}
