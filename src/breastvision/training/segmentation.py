"""The auxiliary mask loss of mask-guided training: binary cross-entropy plus soft Dice.

Cross-entropy alone is dominated by the background (lesions cover a small part of a BUSI image);
the soft Dice term, computed per image, weighs the lesion's overlap whatever its size. For an
image without a lesion (``normal``) the Dice term is ``1 − s / (predicted area + s)`` with the
smoothing ``s``: zero for an empty prediction, growing with the area it paints.
"""

from __future__ import annotations

import torch
from torch import nn


def mask_loss(mask_logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over the batch of BCE-with-logits + ``1 − soft Dice`` for B×1×H×W logits and 0/1 masks."""
    target = target.to(mask_logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(mask_logits, target)
    probs = torch.sigmoid(mask_logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (probs * flat).sum(1) + smooth) / (probs.sum(1) + flat.sum(1) + smooth)
    return bce + (1 - dice).mean()
