"""Readers: one per dataset format, all producing a :class:`~breastvision.data.records.Catalog`.

:func:`read_dataset` is the single entry point. ``source`` is either a known dataset name
(:data:`KNOWN_DATASETS`, looked up below the data root by :func:`breastvision.paths.dataset_dir`) or
a path (an existing path wins over a known name), whose format is detected in this order:

1. a ``.csv`` file, or a folder holding ``manifest.csv``: a BreakHis-style manifest when it has the
   columns ``path,label,subtype,patient_id,magnification``, otherwise a generic manifest
   ``path,label[,group]`` (``tile_group`` also names the group column);
2. a folder whose sub-folders are LC25000 classes (``lung_aca``, ``lung_n``, ``lung_scc``);
3. a BUSI Kaggle tree: ``*_mask*`` files in its class folders, or all of normal/benign/malignant
   holding no DICOM file (DICOM class folders are a hospital's own data: step 5, grouped by patient);
4. a folder holding any file with an official BreakHis name (a flat folder or the official tree);
5. otherwise a generic class-per-folder tree.

Options (keyword arguments) depend on the format: ``group_by`` and ``magnification`` for BreakHis,
``near_duplicates`` for BUSI and generic data, ``class_names`` for generic data, ``verify`` (decode
every image in full, the only way to find truncated pixel data) for all. An option that does not
apply to the detected format is an error, never silently ignored.
"""

from __future__ import annotations

import csv
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from breastvision.data.dicom import DICOM_EXTENSIONS
from breastvision.data.io import is_image_file
from breastvision.data.readers import breakhis, busi, generic, lc25000
from breastvision.data.readers._common import MANIFEST_NAME, walk_files
from breastvision.data.records import Catalog
from breastvision.errors import BreastvisionError
from breastvision.paths import DATASET_DIRS, dataset_dir

KNOWN_DATASETS = tuple(DATASET_DIRS)


def _manifest_reader(manifest: Path) -> tuple[str, Callable[..., Catalog]]:
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            columns = [c.strip() for c in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError) as err:
        raise BreastvisionError(f"{manifest}: cannot read manifest ({err})") from None
    if breakhis.is_breakhis_manifest(columns):
        return "breakhis-manifest", breakhis.read_breakhis_manifest
    return "manifest", generic.read_manifest


def detect_format(path: Path) -> tuple[str, Callable[..., Catalog], Path]:
    """The format of a path, the reader for it, and the path that reader takes."""
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise BreastvisionError(f"{path}: expected a dataset folder or a CSV manifest")
        return (*_manifest_reader(path), path)
    if not path.is_dir():
        raise BreastvisionError(
            f"'{path}' is neither a known dataset ({', '.join(KNOWN_DATASETS)}) nor an existing path"
        )
    entries = list(path.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not any(map(is_image_file, entries[0].iterdir())):
        # An archive's wrapper folder (busi/Dataset_BUSI_with_GT): the data is one level down. A
        # single folder of images is instead a one-class tree (an external set of one class).
        return detect_format(entries[0])
    if (path / MANIFEST_NAME).is_file():
        return (*_manifest_reader(path / MANIFEST_NAME), path / MANIFEST_NAME)
    folders = {p.name for p in entries if p.is_dir()}
    if folders & set(lc25000.CLASS_NAMES):
        return "lc25000", lc25000.read_lc25000, path
    busi_files = [f for name in folders & set(busi.CLASS_NAMES) for f in (path / name).iterdir()]
    has_masks = any(busi.is_mask_name(f) for f in busi_files)
    has_dicom = any(f.suffix.lower() in DICOM_EXTENSIONS for f in busi_files)
    if has_masks or (set(busi.CLASS_NAMES) <= folders and not has_dicom):
        return "busi", busi.read_busi, path
    if any(breakhis.NAME_PATTERN.match(f.name) for f in walk_files(path)):
        return "breakhis-names", breakhis.read_breakhis_names, path
    return "class-folders", generic.read_class_tree, path


def _accepted(reader: Callable[..., Catalog]) -> set[str]:
    # The first parameter is the path; ``fmt`` is internal.
    return set(list(inspect.signature(reader).parameters)[1:]) - {"fmt"}


def _resolve(source: str | os.PathLike, root: str | os.PathLike | None) -> tuple[str, Callable, Path, dict]:
    """Format, reader, the path it takes, and the fixed options (a known dataset's name)."""
    text = os.fspath(source)
    if text in KNOWN_DATASETS and not Path(text).exists():
        return (*detect_format(dataset_dir(text, root)), {"name": text})
    return (*detect_format(Path(text).expanduser().absolute()), {})


def applicable_options(
    source: str | os.PathLike, root: str | os.PathLike | None, options: dict[str, Any]
) -> dict[str, Any]:
    """The subset of ``options`` that the reader for ``source`` takes (for commands over many
    datasets, where e.g. a BreakHis grouping must not stop BUSI from being read)."""
    accepted = _accepted(_resolve(source, root)[1])
    return {k: v for k, v in options.items() if k in accepted}


def read_dataset(source: str | os.PathLike, root: str | os.PathLike | None = None, **options: Any) -> Catalog:
    """Read a dataset by known name or by path (see the module docstring); options set to None are
    left at the reader's default. ``catalog.meta`` records the format, the source and the options."""
    fmt, reader, target, fixed = _resolve(source, root)
    # A name stays a name (found again under any data root); a path is kept absolute for split files.
    origin = fixed.get("name") or str(Path(os.fspath(source)).expanduser().absolute())
    accepted = _accepted(reader)
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - accepted)
    if unknown:
        raise BreastvisionError(
            f"option(s) {', '.join(unknown)} do not apply to {fmt} data at {target} "
            f"(it takes {', '.join(sorted(accepted - {'cache', 'name'}))})"
        )
    catalog = reader(target, **fixed, **given)
    catalog.meta["source"] = origin
    return catalog


__all__ = ["KNOWN_DATASETS", "applicable_options", "detect_format", "read_dataset"]
