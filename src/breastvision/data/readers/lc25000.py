"""LC25000 lung histopathology: ``lung_aca``, ``lung_n``, ``lung_scc`` class folders.

LC25000 was made by rotating and flipping 250 tiles per class about 20 times, so copies of one tile
must stay on one side of a split. Their ``tile_group`` comes from a ``manifest.csv``
(``path,label,tile_group``, as in ``../shared/data/lc25000``), looked for in the image folder and
its parent. Without one, every image is its own group, and the catalog notes that splits are leaky.
"""

from __future__ import annotations

import csv
from pathlib import Path

from breastvision.data.readers._common import MANIFEST_NAME
from breastvision.data.readers.generic import read_class_tree, read_manifest
from breastvision.data.records import Catalog
from breastvision.models.tta import HISTOLOGY

CLASS_NAMES = ["lung_aca", "lung_n", "lung_scc"]


def find_manifest(folder: Path) -> Path | None:
    """A ``manifest.csv`` with a ``tile_group`` column whose first image lies inside ``folder``."""
    for candidate in (folder / MANIFEST_NAME, folder.parent / MANIFEST_NAME):
        if not candidate.is_file():
            continue
        with candidate.open(newline="", encoding="utf-8-sig") as handle:
            first = next(csv.DictReader(handle), None)
        if first and "tile_group" in first and first.get("path"):
            if (candidate.parent / first["path"]).resolve().is_relative_to(folder.resolve()):
                return candidate
    return None


def read_lc25000(folder: Path, *, verify: bool = False, name: str = "lc25000") -> Catalog:
    """Read LC25000 lung images, grouped by ``tile_group`` when a manifest is found."""
    manifest = find_manifest(folder)
    if manifest is not None:
        catalog = read_manifest(
            manifest, class_names=CLASS_NAMES, verify=verify, name=name, fmt="lc25000-manifest"
        )
    else:
        catalog = read_class_tree(folder, class_names=CLASS_NAMES, verify=verify, name=name, fmt="lc25000")
        catalog.meta["notes"] = [
            "no tile_group manifest found: each image is its own group, so rotated/flipped copies of "
            "one LC25000 tile can straddle a split (leaky)"
        ]
    # Nothing to choose when reading LC25000 again (e.g. from a split file).
    catalog.meta["read_options"] = {}
    catalog.meta["modality"] = HISTOLOGY
    return catalog
