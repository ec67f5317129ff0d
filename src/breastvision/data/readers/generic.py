"""A user's own data: a class-per-folder tree, or a CSV manifest ``path,label[,group]``.

This is how a hospital's external validation set comes in. Without a group column every image is
its own group (say so in reports); ``near_duplicates=True`` groups copies of one scan by perceptual
hash instead, as for BUSI. Columns other than ``path`` and ``label`` go into ``Record.meta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from breastvision.data import dedup
from breastvision.data.readers._common import (
    common_root,
    finish_catalog,
    header_meta,
    read_manifest_rows,
    scan_class_tree,
    unlisted_images,
)
from breastvision.data.records import Catalog, Record, Skipped
from breastvision.errors import BreastvisionError

#: Column names taken as the group column of a manifest, in order of preference.
GROUP_COLUMNS = ("group", "tile_group", "patient", "patient_id")


def _finish(
    *,
    name: str,
    root: Path,
    class_names: list[str],
    records: list[Record],
    skipped: list[Skipped],
    grouping: str,
    meta: dict[str, Any],
    near_duplicates: bool,
    verify: bool,
    cache: dedup.HashCache | None,
) -> Catalog:
    notes = meta.setdefault("notes", [])
    if near_duplicates and records:
        records, bad, meta["near_duplicates"] = dedup.group_near_duplicates(records, root, class_names, cache)
        skipped = skipped + bad
        grouping = "near_duplicate"
    elif grouping == "image":
        notes.append("no groups given: each image is its own group, so related images can straddle a split")
    return finish_catalog(
        name=name,
        root=root,
        class_names=class_names,
        records=records,
        skipped=skipped,
        grouping=grouping,
        meta=meta,
        verify=verify,
    )


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
            header = header_meta(path, skipped)
            if header is not None:
                records.append(Record(path, label, path.relative_to(folder).as_posix(), header))
    return _finish(
        name=name or folder.name,
        root=folder,
        class_names=names,
        records=records,
        skipped=skipped,
        grouping="image",
        meta={"format": fmt, "read_options": {"near_duplicates": near_duplicates}},
        near_duplicates=near_duplicates,
        verify=verify,
        cache=cache,
    )


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
    """A CSV with ``path`` (relative to the CSV's folder, or absolute), ``label`` and optionally a
    group column (the first of :data:`GROUP_COLUMNS` present). Labels are class names; without
    ``class_names`` the classes are the labels found, sorted."""
    rows, columns, repeats = read_manifest_rows(manifest, ("path", "label"))
    if not rows:
        raise BreastvisionError(f"{manifest}: manifest lists no images")
    group_column = manifest_group_column(columns)
    if near_duplicates and group_column:
        raise BreastvisionError(
            f"{manifest}: its '{group_column}' column already gives the groups; "
            "near-duplicate grouping would replace them (drop one of the two)"
        )
    names = list(class_names) if class_names is not None else sorted({r.label for r in rows if r.label})
    root = common_root([row.path for row in rows])
    skipped = repeats + unlisted_images(root, {row.path for row in rows}, manifest)
    records = []
    for row in rows:
        if row.label not in names:
            skipped.append(Skipped(row.path, f"unknown label '{row.label}' (expected {', '.join(names)})"))
            continue
        if group_column and not row.fields[group_column]:
            skipped.append(Skipped(row.path, f"empty '{group_column}' in {manifest.name}"))
            continue
        if not row.path.is_file():
            skipped.append(Skipped(row.path, f"listed in {manifest.name} but missing on disk"))
            continue
        header = header_meta(row.path, skipped)
        if header is None:
            continue
        extra = {k: v for k, v in row.fields.items() if k not in ("path", "label")}
        group = row.fields[group_column] if group_column else row.path.relative_to(root).as_posix()
        records.append(Record(row.path, names.index(row.label), group, {**extra, **header}))
    return _finish(
        name=name or manifest.parent.name,
        root=root,
        class_names=names,
        records=records,
        skipped=skipped,
        grouping=group_column or "image",
        meta={"format": fmt, "manifest": str(manifest), "read_options": {"near_duplicates": near_duplicates}},
        near_duplicates=near_duplicates,
        verify=verify,
        cache=cache,
    )
