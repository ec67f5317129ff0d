"""BUSI in its Kaggle layout: ``{normal,benign,malignant}/NAME.png`` with lesion masks beside them.

``NAME_mask.png``, ``NAME_mask_1.png``, ... are masks of ``NAME.png``: they become that record's
``masks`` (in that order) and are never samples. A mask whose image is missing, or whose size
differs from it, is a listed skip.

Class order is fixed to **normal, benign, malignant** everywhere (labels 0, 1, 2): the order the
System U paper and the BUSI paper name them in, and a severity order, so a confusion matrix reads
from healthy to cancer. Groups are near-duplicate groups (see :mod:`breastvision.data.dedup`).
"""

from __future__ import annotations

import re
from pathlib import Path

from breastvision.data import dedup
from breastvision.data.readers._common import finish_catalog, header_meta, scan_class_tree
from breastvision.data.records import Catalog, Record, Skipped
from breastvision.models.tta import ULTRASOUND

CLASS_NAMES = ["normal", "benign", "malignant"]
MASK_PATTERN = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)


def is_mask_name(path: Path) -> bool:
    return MASK_PATTERN.match(path.stem) is not None


def _pair_masks(images: list[Path], skipped: list[Skipped]) -> tuple[list[Path], dict[Path, list[Path]]]:
    """Split one class folder's files into sample images and their masks (in mask-index order)."""
    samples = [p for p in images if not is_mask_name(p)]
    by_stem = {(p.parent, p.stem): p for p in samples}
    masks: dict[Path, list[tuple[int, Path]]] = {p: [] for p in samples}
    for path in images:
        match = MASK_PATTERN.match(path.stem)
        if not match:
            continue
        image = by_stem.get((path.parent, match["stem"]))
        if image is None:
            skipped.append(Skipped(path, f"mask without its image (no '{match['stem']}.*' beside it)"))
            continue
        masks[image].append((int(match["index"] or 0), path))
    return samples, {image: [p for _, p in sorted(found)] for image, found in masks.items()}


def read_busi(
    folder: Path,
    *,
    near_duplicates: bool = True,
    verify: bool = False,
    cache: dedup.HashCache | None = None,
    name: str = "busi",
) -> Catalog:
    """Read a BUSI tree. ``near_duplicates=False`` skips perceptual hashing (each image its own
    group): quicker, but then splits can put copies of one scan on both sides."""
    class_names, per_class, skipped = scan_class_tree(folder, CLASS_NAMES)
    records: list[Record] = []
    for label, class_name in enumerate(class_names):
        samples, masks = _pair_masks(per_class.get(class_name, []), skipped)
        for path in samples:
            header = header_meta(path, skipped)
            if header is None:
                continue
            good_masks = []
            for mask in masks[path]:
                mask_header = header_meta(mask, skipped)
                if mask_header is None:
                    continue
                if (mask_header["width"], mask_header["height"]) != (header["width"], header["height"]):
                    skipped.append(
                        Skipped(
                            mask,
                            f"mask is {mask_header['width']}×{mask_header['height']} but its image "
                            f"is {header['width']}×{header['height']}",
                        )
                    )
                    continue
                good_masks.append(mask)
            rel = path.relative_to(folder).as_posix()
            records.append(Record(path, label, rel, {**header}, tuple(good_masks)))
    meta: dict = {"format": "busi", "modality": ULTRASOUND,
                  "read_options": {"near_duplicates": near_duplicates}}
    if not near_duplicates:
        meta["notes"] = ["near-duplicate grouping off: copies of one scan can straddle a split"]
    return finish_catalog(
        name=name,
        root=folder,
        class_names=class_names,
        records=records,
        skipped=skipped,
        grouping="image",
        meta=meta,
        verify=verify,
        near_duplicates=near_duplicates,
        cache=cache,
    )
