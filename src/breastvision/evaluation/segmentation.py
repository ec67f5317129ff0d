"""Dice of the auxiliary lesion-mask head on test images (mask-guided BUSI training).

Per image, torchmetrics' Dice (``2|P∩T| / (|P|+|T|)``) of the thresholded mask logits against the
target. An image whose target and prediction are both empty (a ``normal`` image left empty) scores
1 rather than torchmetrics' NaN: it is a correct answer, and dropping it would hide a head that
paints lesions onto normal images. The summary also gives the mean over lesion images alone, the
number comparable with segmentation papers, which leave normal images out.
"""

from __future__ import annotations

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


def dice_summary(mask_logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.0) -> dict[str, float]:
    """``dice`` over all images and ``dice_lesion`` over images whose target has a lesion (NaN when
    none has); a pixel is predicted lesion where its logit exceeds ``threshold`` (0: probability ½)."""
    scores = dice_per_image(mask_logits > threshold, target)
    lesion = target.bool().flatten(1).any(dim=1)
    return {
        "dice": float(scores.mean()),
        "dice_lesion": float(scores[lesion].mean()) if lesion.any() else float("nan"),
        "images": int(scores.numel()),
        "lesion_images": int(lesion.sum()),
    }
