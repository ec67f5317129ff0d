"""Image views: what one (image, view name) pair becomes as a model input, deterministically.

A *view* is a name: a dihedral view of ``breastvision.data.transforms`` (``identity``, ``rot90``,
… — paper 000's offline augmentation and test-time augmentation) or ``aug<k>``, the k-th random
draw of a training augmentation pipeline (paper 003's "expanded 5×"). Draw ``k`` of an image is
seeded by (run seed, the image's path relative to its dataset root, ``k``), so it is the same in
every epoch, every process and every run with that seed, which is what lets frozen-layer outputs be
cached (``feature_cache``). With ``fresh_each_epoch`` the epoch joins the seed and the draws change.
A test-time augmentation view, ``tta:<dihedral view>`` (:func:`tta_view`: the validation images'
views under ``data.tta``), is the evaluated image's tensor under that view, exactly as the
predictors' test-time augmentation makes it: a flip applied before pre-processing gives another
image when the centre crop's margin is odd, and can differ by the resize's rounding otherwise.

Stain normalisation comes first (a disk cache of normalised files, ``data.stain_cache``), then the
view, then the model's pre-processing (``data.transforms.eval_transform``) — or, for ``aug<k>``
views, the augmentation pipeline, which ends in the same normalisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from breastvision.data import transforms
from breastvision.data.io import load_image
from breastvision.data.masks import mask_alone, union_mask, with_mask
from breastvision.data.records import Record
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing
from breastvision.training.config import ViewConfig

AUG_PREFIX = "aug"
TTA_PREFIX = "tta:"


def tta_view(name: str) -> str:
    """The view name of dihedral view ``name`` taken of the pre-processed tensor (module docstring)."""
    return f"{TTA_PREFIX}{name}"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (unlike ``hash``)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def training_views(config: ViewConfig) -> list[str]:
    """The view names each training image contributes under ``config``."""
    if config.include_identity and config.kind != "random":
        raise BreastvisionError(
            "data.views.include_identity goes with kind: random (a dihedral view list names 'identity')"
        )
    if config.kind == "identity":
        return ["identity"]
    if config.kind == "dihedral":
        unknown = [n for n in config.names if n not in transforms.DIHEDRAL_8]
        if unknown:
            raise BreastvisionError(
                f"unknown dihedral view(s) {unknown}; choose from {', '.join(transforms.DIHEDRAL_8)}"
            )
        return list(config.names)
    draws = [f"{AUG_PREFIX}{k}" for k in range(config.count)]
    return ["identity", *draws] if config.include_identity else draws


@dataclass
class Item:
    """One model input: a view of a record; ``target`` is the prediction it contributes to (the
    views of one test image under test-time augmentation share a target)."""

    record: Record
    relpath: str
    view: str
    target: int


class ViewRenderer:
    """Turns an :class:`Item` into a tensor (see the module docstring)."""

    def __init__(
        self,
        config: ViewConfig,
        preprocessing: Preprocessing,
        normalized_files: dict[Path, Path] | None = None,
    ):
        self.config = config
        self.preprocessing = preprocessing
        self.normalized_files = normalized_files or {}
        # The stain normaliser is applied through the disk cache, not per call.
        pixels_only = Preprocessing(**{**asdict(preprocessing), "stain": None})
        self.eval = transforms.eval_transform(pixels_only)
        self.augment = transforms.train_transform(config.augment, pixels_only)

    @property
    def fixed(self) -> bool:
        """Whether every view is the same in every epoch (the condition for caching)."""
        return not (self.config.kind == "random" and self.config.fresh_each_epoch)

    def context(self) -> dict[str, Any]:
        """Everything besides the image and view name that changes a view's pixels."""
        return {
            "preprocessing": asdict(self.preprocessing),
            "augment": self.config.augment,
            "seed": self.config.seed,
        }

    @staticmethod
    def is_draw(item: Item) -> bool:
        """Whether the item is a random augmentation's draw (``aug<k>``) rather than a dihedral view."""
        return item.view.startswith(AUG_PREFIX) and item.view[len(AUG_PREFIX) :].isdigit()

    def _transform(self, item: Item, epoch: int) -> Callable[[Any], Any]:
        """The ``v2`` transform of the item's view, after its dihedral view (:meth:`_view`)."""
        if not self.is_draw(item):
            return self.eval
        parts: tuple[object, ...] = (self.config.seed, item.relpath, item.view)
        if not self.fixed:
            parts += (epoch,)
        seed = derive_seed(*parts)
        return lambda inputs: transforms.augmented_view(self.augment, inputs, seed)

    def _view(self, item: Item, image: Image.Image) -> Image.Image:
        return image if self.is_draw(item) else transforms.apply_view(image, item.view)

    def _image(self, item: Item) -> Image.Image:
        return load_image(self.normalized_files.get(item.record.path, item.record.path))

    def __call__(self, item: Item, epoch: int = 0) -> torch.Tensor:
        if item.view.startswith(TTA_PREFIX):
            return transforms.apply_view(self.eval(self._image(item)), item.view.removeprefix(TTA_PREFIX))
        return self._transform(item, epoch)(self._view(item, self._image(item)))

    def render_with_mask(self, item: Item, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tensor, 1×H×W bool lesion mask)``: the tensor is the one :meth:`__call__` gives (the
        same draw), the mask its image's union of masks through the same geometry (``data.masks``)."""
        image = self._image(item)
        mask = union_mask(item.record, image.size)
        return with_mask(self._transform(item, epoch), self._view(item, image), self._view(item, mask))

    def render_mask(self, item: Item, epoch: int = 0) -> torch.Tensor:
        """The mask :meth:`render_with_mask` gives, without decoding the image (its size comes
        from the file's header): what mask-guided training on cached features keeps per view."""
        return mask_alone(self._transform(item, epoch), self._view(item, union_mask(item.record)))


class ViewDataset(Dataset):
    """``(tensor, label, index)`` per item, or with ``masks`` ``(tensor, label, index, mask)`` for
    mask-guided training; ``set_epoch`` re-draws ``fresh_each_epoch`` views."""

    def __init__(self, items: Sequence[Item], renderer: ViewRenderer, masks: bool = False):
        self.items = list(items)
        self.renderer = renderer
        self.masks = masks
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def labels(self) -> list[int]:
        return [item.record.label for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.items[index]
        if self.masks:
            tensor, mask = self.renderer.render_with_mask(item, self.epoch)
            return tensor, item.record.label, index, mask
        return self.renderer(item, self.epoch), item.record.label, index
