"""Lesion-mask targets for mask-guided training (BUSI): one binary mask per image, carried through
exactly the geometric transform its image goes through.

An image's target is the **union** of its mask files (``Record.masks``: BUSI draws one file per
lesion, ``NAME_mask.png``, ``NAME_mask_1.png``, ...); an image without masks (``normal``) has an
all-zero target, which is the right answer for it, not a missing one.

Alignment comes from torchvision's ``v2`` transforms rather than from a second geometry written
here: a ``tv_tensors.Mask`` passed together with the image gets the same resize, crop, flip,
rotation and translation (one random draw for both), with nearest-neighbour resampling and zero
fill, while colour jitter and normalisation leave it alone. So the mask of draw ``k`` of a training
augmentation, or of a dihedral view, is the mask of exactly that image tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from breastvision.data import transforms
from breastvision.data.io import load_mask, read_header
from breastvision.data.records import Record
from breastvision.models.bundle import Preprocessing


def union_mask(record: Record, size: tuple[int, int] | None = None) -> Image.Image:
    """The union of ``record.masks`` as an ``L`` image (0 or 255), all zero when it has none.

    ``size`` (width, height) is the image's, when the caller has it decoded already; otherwise the
    image header gives it. A mask of another size raises ``BadImageError`` (``io.load_mask``).
    """
    if size is None:
        header = read_header(record.path)
        size = (header.width, header.height)
    union = np.zeros((size[1], size[0]), dtype=bool)
    for path in record.masks:
        union |= np.asarray(load_mask(path, size)) > 0
    return Image.fromarray(union.astype(np.uint8) * 255, mode="L")


def _as_mask(mask: Image.Image) -> tv_tensors.Mask:
    return tv_tensors.Mask(F.pil_to_tensor(mask))


def _binary(mask: torch.Tensor) -> torch.Tensor:
    return mask.as_subclass(torch.Tensor) > 0


def with_mask(
    transform: Callable[[Any], Any], image: transforms.ImageOrTensor, mask: Image.Image
) -> tuple[torch.Tensor, torch.Tensor]:
    """``transform`` applied to the image and its mask together: ``(image tensor, 1×H×W bool mask)``.

    ``transform`` is a ``v2`` pipeline (``transforms.eval_transform``, ``train_transform``...),
    called once on the pair, so random transforms draw once for both.
    """
    out_image, out_mask = transform((image, _as_mask(mask)))
    return out_image, _binary(out_mask)


def mask_alone(transform: Callable[[Any], Any], mask: Image.Image) -> torch.Tensor:
    """``transform`` applied to the mask without its image: the 1×H×W bool mask :func:`with_mask`
    gives, as long as the image has the mask's size. ``v2`` transforms draw their random parameters
    whatever they are applied to (colour jitter included), so a seeded draw is the same draw."""
    return _binary(transform(_as_mask(mask)))


def mask_target(
    record: Record, preprocessing: Preprocessing | Mapping[str, Any], view: str = "identity"
) -> torch.Tensor:
    """The 1×H×W bool target of ``record`` under dihedral ``view`` and the deterministic
    pre-processing (``transforms.preprocess_image``'s geometry), e.g. for Dice on test images."""
    mask = transforms.apply_view(union_mask(record), view)
    return mask_alone(transforms.eval_transform(preprocessing), mask)
