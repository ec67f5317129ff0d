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

from breastvision.data import dedup, dicom
from breastvision.data.io import (
    BadImageError,
    file_problem,
    is_image_file,
    load_image,
    load_mask,
    read_header,
)
from breastvision.data.records import Catalog, Record, Skipped
from breastvision.errors import BreastvisionError

MANIFEST_NAME = "manifest.csv"


def walk_files(folder: Path) -> list[Path]:
    """Every entry below ``folder`` that is not a folder, sorted, so reading order never depends on the
    file system. Links to folders are not followed (a link loop would never end) but are returned,
    like broken links and FIFOs, so that they are listed as skips (:func:`not_image_reason`), not lost."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        base = Path(dirpath)
        linked = [name for name in dirnames if (base / name).is_symlink()]
        found.extend(base / name for name in sorted(filenames + linked))
    return found


def not_image_reason(path: Path) -> str:
    """Why a file without an image extension is skipped: what it is, if not a regular file."""
    return file_problem(path) or f"not an image file (extension '{path.suffix or 'none'}')"


def partition_images(files: Iterable[Path]) -> tuple[list[Path], list[Skipped]]:
    """Files with an image extension (their content is checked when read), and every other file as a skip."""
    images, skipped = [], []
    for path in files:
        if is_image_file(path):
            images.append(path)
        else:
            skipped.append(Skipped(path, not_image_reason(path)))
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


#: ``Catalog.grouping`` of data whose groups all come from DICOM Patient IDs (so they are patients),
#: or from Patient IDs and Study Instance UIDs, or from DICOM identifiers for some images only.
DICOM_GROUPINGS = ("patient", "patient_or_study", "dicom_or_image")


def image_records(
    path: Path, label: int, group: str, meta: dict[str, Any], skipped: list[Skipped], *, dicom_group: bool
) -> list[Record]:
    """The records of one image file, its header facts added to ``meta``; a bad file is appended to
    ``skipped`` and gives none. A multi-frame DICOM gives one record per frame (``file.dcm#frame=K``),
    all in one group; with ``dicom_group`` a DICOM's group is its patient (else study) hash."""
    if not dicom.is_dicom(path):
        header = header_meta(path, skipped)
        return [] if header is None else [Record(path, label, group, {**meta, **header})]
    try:
        info = dicom.read_info(path)
    except BadImageError as err:
        skipped.append(Skipped(path, err.reason))
        return []
    meta = {**meta, "width": info.width, "height": info.height, "mode": info.mode, **info.meta()}
    group = (info.group if dicom_group else None) or group
    if dicom.split_frame(path)[1] is not None or info.frames == 1:
        return [Record(path, label, group, {**meta, "frame": dicom.split_frame(path)[1] or 1})]
    return [Record(dicom.frame_path(path, k), label, group, {**meta, "frame": k})
            for k in range(1, info.frames + 1)]


def dicom_grouping(records: Sequence[Record], default: str) -> str:
    """How the groups of records from :func:`image_records` were formed (:data:`DICOM_GROUPINGS`)."""
    kinds = {r.group.split(":", 1)[0] if r.group.startswith(("patient:", "study:")) else "" for r in records}
    if not kinds - {""}:
        return default
    if kinds == {"patient"}:
        return DICOM_GROUPINGS[0]
    return DICOM_GROUPINGS[1] if "" not in kinds else DICOM_GROUPINGS[2]


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
    """Rows of a CSV manifest with paths resolved against its folder, its column names, and the rows
    not taken: repeated listings of a path (only the first counts: one file is one sample) and
    paths that leave the manifest's folder (:func:`_outside_reason`)."""
    folder = Path(os.path.abspath(manifest.parent))
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
            refused = []
            for number, raw in enumerate(reader, start=2):
                fields = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                path = Path(os.path.normpath(folder / fields["path"]))
                outside = _outside_reason(fields["path"], path, folder, f"row {number} of {manifest.name}")
                if outside:
                    refused.append(Skipped(path, outside))
                    continue
                if path in rows:
                    reason = f"listed again in {manifest.name} (row {number}); the first listing is used"
                    refused.append(Skipped(path, reason))
                    continue
                rows[path] = ManifestRow(path, fields["label"], fields)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise BreastvisionError(f"{manifest}: cannot read manifest ({err})") from None
    return list(rows.values()), columns, refused


def _outside_reason(text: str, path: Path, folder: Path, where: str) -> str | None:
    """Why a manifest row's path is refused: empty, or outside the manifest's folder (an absolute path
    elsewhere, a ``../`` escape). The dataset root is the deepest folder holding every row, so one
    such row would widen it (up to ``/``) and make the scan for unlisted files walk the whole disk."""
    if not text or path == folder:
        return f"empty path in {where}"
    if not path.is_relative_to(folder):
        return f"outside the manifest's folder {folder} ({where}); paths must lie inside it"
    return None


def common_root(paths: Sequence[Path]) -> Path:
    """Deepest folder holding all ``paths``: relative paths (and so split hashes) then do not depend
    on whether the user pointed at the manifest or at the image folder."""
    return Path(os.path.commonpath([str(p.parent) for p in paths]))


def read_manifest_listing(
    manifest: Path, required: Sequence[str]
) -> tuple[list[ManifestRow], list[str], Path, list[Skipped]]:
    """A manifest's rows, its column names, the folder the rows are relative to, and the skips
    known before any row is checked (repeated listings, paths outside the manifest's folder, files
    on disk the manifest leaves out).
    A manifest listing nothing is a user error."""
    rows, columns, refused = read_manifest_rows(manifest, required)
    if not rows:
        first = refused[0] if refused else None
        detail = f" it can use ({len(refused)} refused, e.g. {first.path}: {first.reason})" if first else ""
        raise BreastvisionError(f"{manifest}: manifest lists no images{detail}")
    root = common_root([row.path for row in rows])
    listed = {dicom.split_frame(row.path)[0] for row in rows}
    return rows, columns, root, refused + unlisted_images(root, listed, manifest)


def listed_on_disk(row: ManifestRow, manifest: Path, skipped: list[Skipped]) -> bool:
    """Whether a manifest row's file exists (a frame of a DICOM file: that file); one missing is
    appended to ``skipped``, naming the manifest."""
    if dicom.split_frame(row.path)[0].is_file():
        return True
    skipped.append(Skipped(row.path, f"listed in {manifest.name} but missing on disk"))
    return False


def listed_header(row: ManifestRow, manifest: Path, skipped: list[Skipped]) -> dict[str, Any] | None:
    """:func:`header_meta` of a manifest row's file; one missing on disk is appended to ``skipped``
    (naming the manifest) and gives None."""
    return header_meta(row.path, skipped) if listed_on_disk(row, manifest, skipped) else None


def unlisted_images(root: Path, listed: set[Path], manifest: Path) -> list[Skipped]:
    """Files below ``root`` that a manifest does not list: reported, never silently dropped."""
    skipped = []
    for path in walk_files(root):
        if path == manifest or path in listed:
            continue
        unlisted_image = is_image_file(path)
        reason = "image on disk but not listed in the manifest" if unlisted_image else not_image_reason(path)
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
