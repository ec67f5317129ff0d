"""A user's own data: a class-per-folder tree, or a CSV manifest ``path,label[,group]``.

This is how a hospital's external validation set comes in. Without a group column every image is
its own group (say so in reports); ``near_duplicates=True`` groups copies of one scan by perceptual
hash instead, as for BUSI. Columns other than ``path`` and ``label`` go into ``Record.meta``.

DICOM files are grouped by patient (a hash of Patient ID, else of Study Instance UID; see
``data.dicom``) unless a manifest's group column says otherwise; every frame of a multi-frame file
is a record named ``file.dcm#frame=K``, and a manifest row may name one frame that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from breastvision.data import dedup
from breastvision.data.readers._common import (
    dicom_grouping,
    finish_catalog,
    image_records,
    listed_on_disk,
    read_manifest_listing,
    scan_class_tree,
)
from breastvision.data.records import Catalog, Record, Skipped
from breastvision.errors import BreastvisionError

#: Column names taken as the group column of a manifest, in order of preference.
GROUP_COLUMNS = ("group", "tile_group", "patient", "patient_id")


def _catalog_meta(fmt: str, grouping: str, near_duplicates: bool, **extra: str) -> dict[str, Any]:
    notes = []
    if grouping == "image" and not near_duplicates:
        notes.append("no groups given: each image is its own group, so related images can straddle a split")
    if grouping in ("patient_or_study", "dicom_or_image"):
        notes.append("DICOM groups are hashed Patient IDs, else Study Instance UIDs, else the file: "
                     "not all groups are patients, so patient-level metrics are off by default")
    return {"format": fmt, **extra, "read_options": {"near_duplicates": near_duplicates}, "notes": notes}


def read_class_tree(
    folder: Path,
    *,
    class_names: Sequence[str] | None = None,
    near_duplicates: bool = False,
    verify: bool = False,
    cache: dedup.HashCache | None = None,
    name: str | None = None,
    fmt: str = "class-folders",
) -> Catalog:
    """One folder per class below ``folder``; images may sit in sub-folders of a class folder.

    Without ``class_names`` the classes are the folders holding images, in sorted order; with it,
    that order is kept and any other folder is a listed skip.
    """
    names, per_class, skipped = scan_class_tree(folder, class_names)
    records = []
    for label, class_name in enumerate(names):
        for path in per_class.get(class_name, []):
            group = path.relative_to(folder).as_posix()
            records.extend(image_records(path, label, group, {}, skipped, dicom_group=True))
    grouping = _checked_grouping(records, near_duplicates, folder)
    return finish_catalog(
        name=name or folder.name,
        root=folder,
        class_names=names,
        records=records,
        skipped=skipped,
        grouping=grouping,
        meta=_catalog_meta(fmt, grouping, near_duplicates),
        near_duplicates=near_duplicates,
        verify=verify,
        cache=cache,
    )


def _checked_grouping(records: Sequence[Record], near_duplicates: bool, source: Path) -> str:
    grouping = dicom_grouping(records, "image")
    if near_duplicates and grouping != "image":
        raise BreastvisionError(
            f"{source}: DICOM patient / study identifiers already give the groups; "
            "near-duplicate grouping would replace them (leave it off for DICOM data)"
        )
    return grouping


def manifest_group_column(columns: Sequence[str]) -> str | None:
    return next((c for c in GROUP_COLUMNS if c in columns), None)


def read_manifest(
    manifest: Path,
    *,
    class_names: Sequence[str] | None = None,
    near_duplicates: bool = False,
    verify: bool = False,
    cache: dedup.HashCache | None = None,
    name: str | None = None,
    fmt: str = "manifest",
) -> Catalog:
    """A CSV with ``path`` (relative to the CSV's folder, or absolute; either way inside that folder),
    ``label`` and optionally a
    group column (the first of :data:`GROUP_COLUMNS` present). Labels are class names; without
    ``class_names`` the classes are the labels found, sorted."""
    rows, columns, root, skipped = read_manifest_listing(manifest, ("path", "label"))
    group_column = manifest_group_column(columns)
    if near_duplicates and group_column:
        raise BreastvisionError(
            f"{manifest}: its '{group_column}' column already gives the groups; "
            "near-duplicate grouping would replace them (drop one of the two)"
        )
    names = list(class_names) if class_names is not None else sorted({r.label for r in rows if r.label})
    records = []
    for row in rows:
        if row.label not in names:
            skipped.append(Skipped(row.path, f"unknown label '{row.label}' (expected {', '.join(names)})"))
            continue
        if group_column and not row.fields[group_column]:
            skipped.append(Skipped(row.path, f"empty '{group_column}' in {manifest.name}"))
            continue
        if not listed_on_disk(row, manifest, skipped):
            continue
        extra = {k: v for k, v in row.fields.items() if k not in ("path", "label")}
        group = row.fields[group_column] if group_column else row.path.relative_to(root).as_posix()
        records.extend(image_records(row.path, names.index(row.label), group, extra, skipped,
                                     dicom_group=group_column is None))
    grouping = group_column or _checked_grouping(records, near_duplicates, manifest)
    return finish_catalog(
        name=name or manifest.parent.name,
        root=root,
        class_names=names,
        records=records,
        skipped=skipped,
        grouping=grouping,
        meta=_catalog_meta(fmt, grouping, near_duplicates, manifest=str(manifest)),
        near_duplicates=near_duplicates,
        verify=verify,
        cache=cache,
    )
