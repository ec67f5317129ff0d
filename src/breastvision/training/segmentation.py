"""Mask-guided training (``train.mask_loss_weight``): the auxiliary mask loss, the masks the
training items carry, the checks that a run can train the mask head, and its Dice on the test part.

**The loss** is binary cross-entropy plus soft Dice. Cross-entropy alone is dominated by the
background (lesions cover a small part of a BUSI image); the soft Dice term, computed per image,
weighs the lesion's overlap whatever its size. For an image without a lesion (``normal``) the Dice
term is ``1 − s / (predicted area + s)`` with the smoothing ``s``: zero for an empty prediction,
growing with the area it paints. The training loss is ``CE + w · mask loss`` (``loop._losses``).

**Masks per training item.** Without the feature cache the view dataset renders each image with
its mask (``ViewDataset(masks=True)``: one draw for both). With it, each training view's mask is
rendered once, from the mask files alone (``ViewRenderer.render_mask``: the image is not decoded),
and kept in memory beside the cached prefix outputs (:class:`MaskedDataset`), as a bool tensor.

**The head** is the model's ``seg_head`` (``model.kwargs.seg_head: true``, ``models.masking``), on a
single CNN (DenseNet-121(+SE), ResNet-18, GoogLeNet) or a fusion's CNN branch; it reads that CNN's last
feature map, so that map must be computed by the trainable suffix (e.g. the split ``denseblock4``,
or ``cnn.denseblock4,vit.block10`` for a fusion). Its logits are compared with each mask at the
mask's size (``masking.at_size``). Validation, model selection, calibration and prediction never
use it. With ``w = 0`` a head that was built is frozen (never trained), so the run trains exactly
what it would without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, Dataset

from breastvision.errors import BreastvisionError
from breastvision.models.masking import at_size
from breastvision.training.config import ExperimentConfig
from breastvision.training.freezing import freeze


def mask_loss(mask_logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over the batch of BCE-with-logits + ``1 − soft Dice`` for B×1×h×w logits (brought to
    the masks' size) and B×1×H×W 0/1 masks."""
    mask_logits = at_size(mask_logits, target.shape[-2:])
    target = target.to(mask_logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(mask_logits, target)
    probs = torch.sigmoid(mask_logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (probs * flat).sum(1) + smooth) / (probs.sum(1) + flat.sum(1) + smooth)
    return bce + (1 - dice).mean()


def prepare_mask_head(config: ExperimentConfig, model: nn.Module, suffix: nn.Module,
                      records: Sequence[Any]) -> None:
    """Refuse, in one line, a run with ``train.mask_loss_weight > 0`` whose model has no mask head,
    whose split freezes the map the head reads, or whose training images have no masks; with a
    weight of 0, freeze a mask head the model has (module docstring)."""
    weight = config.train.mask_loss_weight
    if not weight:
        if getattr(model, "seg_head", None) is not None:
            freeze(model.seg_head)  # untrained, and no unused parameters for DDP to wait for
        return
    setting = f"train.mask_loss_weight is {weight:g}"
    source = model.mask_source() if getattr(model, "seg_head", None) is not None else None
    if source is None:
        raise BreastvisionError(
            f"{setting} but model {config.model.name} has no mask head: mask-guided training needs a "
            "DenseNet, ResNet, GoogLeNet or fusion built with one (set model.kwargs.seg_head=true)"
        )
    if not hasattr(suffix, "forward_with_mask") or not any(m is source for m in suffix.modules()):
        raise BreastvisionError(
            f"{setting} but model.first_trainable_stage '{config.model.first_trainable_stage}' freezes the "
            f"CNN feature map the mask head reads: train the CNN's last block (e.g. {_last_block(model)})"
        )
    if not any(record.masks for record in records):
        raise BreastvisionError(
            f"{setting} but no training image has a lesion mask (BUSI's NAME_mask.png files)"
        )


def _last_block(model: nn.Module) -> str:
    """The split that trains a model's last block(s) and its head: ``denseblock4``, or per branch."""
    from breastvision.models.staging import stages

    if hasattr(model, "branch_stages"):
        return ",".join(f"{branch}.{names[-2]}" for branch, names in model.branch_stages().items())
    return stages(model)[-2]


class MaskedDataset(Dataset):
    """``(*item, mask)`` per item of ``base`` (``(inputs, label, index)`` items), with ``masks``
    (N×1×H×W bool) held in memory."""

    def __init__(self, base: Dataset, masks: torch.Tensor):
        if len(base) != len(masks):
            raise ValueError(f"{len(masks)} masks for {len(base)} items")
        self.base, self.masks = base, masks

    @property
    def labels(self) -> list[int]:
        return self.base.labels

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return (*self.base[index], self.masks[index])


def render_masks(renderer: Any, items: Sequence[Any]) -> torch.Tensor:
    """Every item's mask under its view (``views.ViewRenderer.render_mask``), stacked."""
    return torch.stack([renderer.render_mask(item) for item in items])


def with_training_masks(dataset: Dataset, items: Sequence[Any], renderer: Any) -> Dataset:
    """The training dataset with each item's mask: rendered with its image when the images are
    rendered per step, else rendered once and kept beside the cached features (module docstring)."""
    from breastvision.training.views import ViewDataset

    if isinstance(dataset, ViewDataset):
        return ViewDataset(dataset.items, dataset.renderer, masks=True)
    return MaskedDataset(dataset, render_masks(renderer, items))


@torch.no_grad()
def mask_dice(fabric: Fabric, suffix: nn.Module, prefix: nn.Module, dataset: Dataset, masks: torch.Tensor,
              batch_size: int) -> dict[str, Any]:
    """``evaluation.segmentation.summarize_dice`` of the mask head on every item of ``dataset``
    (the test views, in order) against ``masks``; on this process alone."""
    from breastvision.evaluation.segmentation import summarize_dice

    suffix.eval()
    predicted = []
    for batch in DataLoader(dataset, batch_size=batch_size):
        with fabric.autocast():
            _, mask_logits = suffix.forward_with_mask(prefix(fabric.to_device(batch[0])))
        predicted.append(at_size(mask_logits.float(), masks.shape[-2:]).cpu() > 0)
    return summarize_dice(torch.cat(predicted), masks)
