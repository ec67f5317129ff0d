"""What every reader shares: walking folders, checking image headers, CSV manifests, finishing a catalog.

Every file a reader meets ends up either in a record or in ``Catalog.skipped`` with a reason.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from breastvision.data import dedup
from breastvision.data.io import BadImageError, is_image_file, load_image, load_mask, read_header
from breastvision.data.records import Catalog, Record, Skipped
from breastvision.errors import BreastvisionError

MANIFEST_NAME = "manifest.csv"


def walk_files(folder: Path) -> list[Path]:
    """Every file below ``folder``, sorted, so reading order never depends on the file system."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in sorted(filenames))
    return found


def partition_images(files: Iterable[Path]) -> tuple[list[Path], list[Skipped]]:
    """Image files, and every other file as a skip."""
    images, skipped = [], []
    for path in files:
        if is_image_file(path):
            images.append(path)
        else:
            skipped.append(Skipped(path, f"not an image file (extension '{path.suffix or 'none'}')"))
    return images, skipped


def header_meta(path: Path, skipped: list[Skipped]) -> dict[str, Any] | None:
    """Width, height and mode from the header, for the record's ``meta``; a bad file is appended
    to ``skipped`` and gives None."""
    try:
        header = read_header(path)
    except BadImageError as err:
        skipped.append(Skipped(path, err.reason))
        return None
    return {"width": header.width, "height": header.height, "mode": header.mode}


def scan_class_tree(
    root: Path, class_names: Sequence[str] | None
) -> tuple[list[str], dict[str, list[Path]], list[Skipped]]:
    """Images per class folder directly below ``root`` (searched recursively inside each folder).

    With ``class_names`` fixed, any other folder is skipped as unknown (listed once, with how many
    files it holds); without, every folder that holds images is a class, in sorted order.
    """
    skipped: list[Skipped] = []
    per_class: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            skipped.append(Skipped(entry, "not inside a class folder"))
            continue
        images, others = partition_images(walk_files(entry))
        if class_names is not None and entry.name not in class_names:
            count = len(images) + len(others)
            skipped.append(
                Skipped(
                    entry,
                    f"unknown class folder '{entry.name}' (expected {', '.join(class_names)}); "
                    f"its {count} files are not used",
                )
            )
            continue
        skipped.extend(others)
        if images:
            per_class[entry.name] = images
        elif class_names is None:
            skipped.append(Skipped(entry, "folder holds no images, so it is not a class"))
    names = list(class_names) if class_names is not None else sorted(per_class)
    return names, per_class, skipped


@dataclass
class ManifestRow:
    path: Path
    label: str
    fields: dict[str, str]


def read_manifest_rows(
    manifest: Path, required: Sequence[str]
) -> tuple[list[ManifestRow], list[str], list[Skipped]]:
    """Rows of a CSV manifest with paths resolved against its folder, its column names, and the
    repeated listings of a path (only the first counts: one file is one sample)."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                raise BreastvisionError(
                    f"{manifest}: manifest lacks column(s) {', '.join(missing)} "
                    f"(has {', '.join(columns) or 'no header'}; needs {', '.join(required)})"
                )
            rows: dict[Path, ManifestRow] = {}
            repeats = []
            for number, raw in enumerate(reader, start=2):
                fields = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                path = Path(os.path.normpath(manifest.parent / fields["path"]))
                if path in rows:
                    reason = f"listed again in {manifest.name} (row {number}); the first listing is used"
                    repeats.append(Skipped(path, reason))
                    continue
                rows[path] = ManifestRow(path, fields["label"], fields)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BreastvisionError(f"{manifest}: cannot read manifest ({err})") from None
    return list(rows.values()), columns, repeats


def common_root(paths: Sequence[Path]) -> Path:
    """Deepest folder holding all ``paths``: relative paths (and so split hashes) then do not depend
    on whether the user pointed at the manifest or at the image folder."""
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def read_manifest_listing(
    manifest: Path, required: Sequence[str]
) -> tuple[list[ManifestRow], list[str], Path, list[Skipped]]:
    """A manifest's rows, its column names, the folder the rows are relative to, and the skips
    known before any row is checked (repeated listings, files on disk the manifest leaves out).
    A manifest listing nothing is a user error."""
    rows, columns, repeats = read_manifest_rows(manifest, required)
    if not rows:
        raise BreastvisionError(f"{manifest}: manifest lists no images")
    root = common_root([row.path for row in rows])
    return rows, columns, root, repeats + unlisted_images(root, {row.path for row in rows}, manifest)


def listed_header(row: ManifestRow, manifest: Path, skipped: list[Skipped]) -> dict[str, Any] | None:
    """:func:`header_meta` of a manifest row's file; one missing on disk is appended to ``skipped``
    (naming the manifest) and gives None."""
    if not row.path.is_file():
        skipped.append(Skipped(row.path, f"listed in {manifest.name} but missing on disk"))
        return None
    return header_meta(row.path, skipped)


def unlisted_images(root: Path, listed: set[Path], manifest: Path) -> list[Skipped]:
    """Files below ``root`` that a manifest does not list: reported, never silently dropped."""
    skipped = []
    for path in walk_files(root):
        if path == manifest or path in listed:
            continue
        reason = (
            "image on disk but not listed in the manifest"
            if is_image_file(path)
            else (f"not an image file (extension '{path.suffix or 'none'}')")
        )
        skipped.append(Skipped(path, reason))
    return skipped


def verify_records(records: list[Record]) -> tuple[list[Record], list[Skipped]]:
    """Decode every image (and mask) in full: the only way to find truncated pixel data."""
    kept, skipped = [], []
    for record in records:
        try:
            image = load_image(record.path)
            for mask in record.masks:
                load_mask(mask, image.size)
        except BadImageError as err:
            # A bad mask disqualifies its image too; the reason then names the mask.
            skipped.append(Skipped(record.path, err.reason if err.path == record.path else str(err)))
            continue
        kept.append(record)
    return kept, skipped


def finish_catalog(
    *,
    name: str,
    root: Path,
    class_names: list[str],
    records: list[Record],
    skipped: list[Skipped],
    grouping: str,
    meta: dict[str, Any],
    verify: bool,
    near_duplicates: bool = False,
    cache: dedup.HashCache | None = None,
) -> Catalog:
    """Group copies of one scan by perceptual hash if asked (``meta["near_duplicates"]`` then says
    how), verify if asked, refuse an empty result with the reasons, and sort records by path."""
    if near_duplicates and records:
        records, bad, meta["near_duplicates"] = dedup.group_near_duplicates(records, root, class_names, cache)
        skipped = skipped + bad
        grouping = "near_duplicate"
    if verify:
        records, bad = verify_records(records)
        skipped = skipped + bad
    if not records:
        reasons = sorted({s.reason.split(": ")[-1] for s in skipped})[:3]
        detail = f"; {len(skipped)} files skipped, e.g. {'; '.join(reasons)}" if skipped else ""
        raise BreastvisionError(f"no usable images found for dataset '{name}' in {root}{detail}")
    records = sorted(records, key=lambda r: r.path.as_posix())
    skipped = sorted(skipped, key=lambda s: s.path.as_posix())
    meta = {**meta, "verified": verify}
    return Catalog(name, root, class_names, records, skipped, grouping, meta)
