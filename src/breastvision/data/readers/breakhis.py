"""BreakHis: official file names (a folder of them, or the official ``BreaKHis_v1`` tree) and
BreakHis-style manifests (``path,label,subtype,patient_id,magnification``).

An official name such as ``SOB_M_DC-14-16716-400-012.png`` reads: biopsy method ``SOB`` (surgical
open biopsy), class ``M``, subtype ``DC``, year ``14`` (2014), slide ``16716``, magnification 400X,
image 12 of that slide at that magnification.

Grouping (what must not straddle a split):

- ``slide`` (default, the BreakHis convention): the slide id as written, e.g. ``29960AB``. BreakHis
  counts its 82 "patients" this way.
- ``patient`` (strict): the numeric part only, so ``29960AB`` and ``29960CD`` are one patient. The
  letters mark different slides of the same person (in the shared 200X copy 29960AB is a
  fibroadenoma and 29960CD an adenosis), so slide grouping can leave one person on both sides.

Physical scale (what whole-slide prediction needs to tile a slide as the model saw BreakHis):
BreakHis records no pixel size, so it is derived from the acquisition Spanhol et al. describe (A
dataset for breast cancer histopathological image classification, IEEE TBME 63(7), 2016, section
II): an Olympus BX-50 with a 3.3× relay lens onto a Samsung SCC-131AN camera whose CCD has
6.5 µm × 6.25 µm pixels, magnifying factors 40X/100X/200X/400X from 4×/10×/20×/40× objectives.
A pixel of an original 700×460 image therefore spans sensor pixel / (objective × 3.3):

=====  ===================
40X    0.4924 × 0.4735 µm
100X   0.1970 × 0.1894 µm
200X   0.0985 × 0.0947 µm
400X   0.0492 × 0.0473 µm
=====  ===================

These are nominal: the paper does not say how the 752×582 CCD frame became 700×460, and other
sources quote other values (kaiko-ai's eva documents 0.25 µm/px at 40X), so a config can state
``data.mpp`` and ``predict-slide`` takes ``--mpp-model``. A resized copy (``breakhis_200x_224``:
each 700×460 field squashed to 224×224) keeps the field but not the pixel, so the model's scale
is computed from the field and the side the model input is resized to (:func:`input_mpp`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from breastvision.data.readers._common import (
    finish_catalog,
    header_meta,
    listed_header,
    partition_images,
    read_manifest_listing,
    walk_files,
)
from breastvision.data.records import Catalog, Record, Skipped
from breastvision.errors import BreastvisionError
from breastvision.models.tta import HISTOLOGY

CLASS_NAMES = ["benign", "malignant"]
SUBTYPES = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
BENIGN_SUBTYPES = frozenset({"A", "F", "PT", "TA"})
MAGNIFICATIONS = (40, 100, 200, 400)
GROUPINGS = ("slide", "patient")
MANIFEST_COLUMNS = ("path", "label", "subtype", "patient_id", "magnification")
#: Spanhol et al. 2016, section II: camera pixel (µm), relay lens, objective per magnifying factor.
SENSOR_PIXEL_UM = (6.5, 6.25)
RELAY_LENS = 3.3
OBJECTIVES = {40: 4, 100: 10, 200: 20, 400: 40}
#: Pixels (width, height) of an original BreakHis image: the field every copy of it shows.
FIELD_PIXELS = (700, 460)

NAME_PATTERN = re.compile(
    r"^(?P<biopsy>[A-Z]+)_(?P<tumour_class>[BM])_(?P<subtype>[A-Z]+)-(?P<year>\d{2})-"
    r"(?P<slide>\d+[A-Z]*)-(?P<magnification>\d+)-(?P<sequence>\d+)\.(?i:png)$"
)
_NAME_FORM = "SOB_<B|M>_<subtype>-<yy>-<slide>-<magnification>-<nnn>.png"


class BreakHisNameError(BreastvisionError):
    """A file name that is not an official BreakHis one; ``reason`` says what does not fit."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"'{name}': {reason}")
        self.reason = reason


@dataclass(frozen=True)
class BreakHisName:
    """The fields of an official BreakHis file name."""

    biopsy: str
    tumour_class: str
    subtype: str
    year: int
    slide: str
    magnification: int
    sequence: int

    @property
    def label(self) -> int:
        return CLASS_NAMES.index("benign" if self.tumour_class == "B" else "malignant")

    @property
    def patient(self) -> str:
        return patient_of(self.slide)

    @property
    def subtype_name(self) -> str:
        return SUBTYPES[self.subtype]


def patient_of(slide: str) -> str:
    """The numeric patient number of a slide id (``29960CD`` → ``29960``)."""
    match = re.match(r"\d+", slide)
    if not match:
        raise BreastvisionError(f"slide id '{slide}' has no numeric patient number")
    return match.group()


def parse_name(name: str) -> BreakHisName:
    """Parse an official BreakHis file name; a ``BreakHisNameError`` says what does not fit."""
    match = NAME_PATTERN.match(name)
    if not match:
        raise BreakHisNameError(name, f"not an official BreakHis file name ({_NAME_FORM})")
    fields = match.groupdict()
    subtype, tumour_class = fields["subtype"], fields["tumour_class"]
    if subtype not in SUBTYPES:
        raise BreakHisNameError(name, f"unknown subtype '{subtype}' (known: {', '.join(SUBTYPES)})")
    if (subtype in BENIGN_SUBTYPES) != (tumour_class == "B"):
        raise BreakHisNameError(name, f"subtype {subtype} contradicts class {tumour_class}")
    magnification = int(fields["magnification"])
    if magnification not in MAGNIFICATIONS:
        raise BreakHisNameError(name, f"magnification {magnification}X is not a BreakHis one")
    return BreakHisName(
        biopsy=fields["biopsy"],
        tumour_class=tumour_class,
        subtype=subtype,
        year=2000 + int(fields["year"]),  # BreakHis was collected in 2014
        slide=fields["slide"],
        magnification=magnification,
        sequence=int(fields["sequence"]),
    )


def parse_magnification(value: int | str) -> int:
    """``200``, ``"200"``, ``"200X"`` → 200; anything else is a user error."""
    text = str(value).strip().upper().removesuffix("X")
    if not text.isdigit() or int(text) not in MAGNIFICATIONS:
        raise BreastvisionError(
            f"magnification '{value}' is not one of {', '.join(f'{m}X' for m in MAGNIFICATIONS)}"
        )
    return int(text)


def microns_per_pixel(magnification: int | str) -> tuple[float, float]:
    """µm per pixel (x, y) of an original 700×460 BreakHis image (module docstring: source, caveats)."""
    objective = OBJECTIVES[parse_magnification(magnification)]
    return (SENSOR_PIXEL_UM[0] / (objective * RELAY_LENS), SENSOR_PIXEL_UM[1] / (objective * RELAY_LENS))


def input_mpp(records: list[Record], side: int) -> tuple[float, float] | None:
    """µm per pixel (x, y) of a model input of ``side``×``side`` pixels that the whole BreakHis
    field is resized to, when every record has one magnification (else ``None``: no one scale)."""
    magnifications = {r.meta.get("magnification") for r in records}
    if len(magnifications) != 1 or None in magnifications:
        return None
    mpp = microns_per_pixel(magnifications.pop())
    return (FIELD_PIXELS[0] * mpp[0] / side, FIELD_PIXELS[1] * mpp[1] / side)


def _wanted_magnifications(group_by: str, value: int | str | list | tuple | None) -> frozenset[int] | None:
    """The magnifications to keep (None: all), once ``group_by`` is known to be a BreakHis grouping:
    both options are checked before any file is read."""
    if group_by not in GROUPINGS:
        raise BreastvisionError(f"BreakHis grouping '{group_by}' unknown; use one of {', '.join(GROUPINGS)}")
    if value is None:
        return None
    values = value if isinstance(value, list | tuple | set | frozenset) else [value]
    return frozenset(parse_magnification(v) for v in values)


def _record(path: Path, label: int, group_by: str, meta: dict[str, Any]) -> Record:
    group = meta["slide"] if group_by == "slide" else meta["patient"]
    return Record(path=path, label=label, group=group, meta=meta)


def _finish(
    fmt: str,
    root: Path,
    records: list[Record],
    skipped: list[Skipped],
    filtered: int,
    group_by: str,
    wanted: frozenset[int] | None,
    verify: bool,
    name: str,
) -> Catalog:
    """The catalog of either reader, recording its options and the ``filtered`` count of images the
    magnification filter dropped."""
    meta: dict[str, Any] = {
        "format": fmt,
        "modality": HISTOLOGY,
        "read_options": {"group_by": group_by, "magnification": sorted(wanted) if wanted else None},
    }
    if wanted:
        meta["filtered_out"] = {f"magnification not {'/'.join(f'{m}X' for m in sorted(wanted))}": filtered}
    return finish_catalog(
        name=name,
        root=root,
        class_names=list(CLASS_NAMES),
        records=records,
        skipped=skipped,
        grouping=group_by,
        meta=meta,
        verify=verify,
    )


def read_breakhis_names(
    folder: Path,
    *,
    group_by: str = "slide",
    magnification: int | str | list | None = None,
    verify: bool = False,
    name: str = "breakhis",
) -> Catalog:
    """Every image below ``folder`` with an official BreakHis name (the official tree included)."""
    wanted = _wanted_magnifications(group_by, magnification)
    images, skipped = partition_images(walk_files(folder))
    records, filtered = [], 0
    for path in images:
        try:
            parsed = parse_name(path.name)
        except BreakHisNameError as err:
            skipped.append(Skipped(path, err.reason))
            continue
        if wanted and parsed.magnification not in wanted:
            filtered += 1
            continue
        header = header_meta(path, skipped)
        if header is None:
            continue
        meta = {
            "biopsy": parsed.biopsy,
            "subtype": parsed.subtype,
            "subtype_name": parsed.subtype_name,
            "year": parsed.year,
            "slide": parsed.slide,
            "patient": parsed.patient,
            "magnification": parsed.magnification,
            "sequence": parsed.sequence,
            **header,
        }
        records.append(_record(path, parsed.label, group_by, meta))
    return _finish("breakhis-names", folder, records, skipped, filtered, group_by, wanted, verify, name)


def read_breakhis_manifest(
    manifest: Path,
    *,
    group_by: str = "slide",
    magnification: int | str | list | None = None,
    verify: bool = False,
    name: str = "breakhis",
) -> Catalog:
    """A BreakHis-style manifest; its ``patient_id`` column holds slide ids (``29960AB``)."""
    wanted = _wanted_magnifications(group_by, magnification)
    rows, _, root, skipped = read_manifest_listing(manifest, MANIFEST_COLUMNS)
    subtype_codes = {v: k for k, v in SUBTYPES.items()}
    records, filtered = [], 0
    for row in rows:
        if row.label not in CLASS_NAMES:
            skipped.append(Skipped(row.path, f"unknown label '{row.label}' (expected benign, malignant)"))
            continue
        try:
            mag = parse_magnification(row.fields["magnification"])
            patient = patient_of(row.fields["patient_id"])
        except BreastvisionError as err:
            skipped.append(Skipped(row.path, str(err)))
            continue
        if wanted and mag not in wanted:
            filtered += 1
            continue
        header = listed_header(row, manifest, skipped)
        if header is None:
            continue
        subtype_name = row.fields["subtype"]
        meta = {
            "subtype": subtype_codes.get(subtype_name, subtype_name),
            "subtype_name": subtype_name,
            "slide": row.fields["patient_id"],
            "patient": patient,
            "magnification": mag,
            **header,
        }
        records.append(_record(row.path, CLASS_NAMES.index(row.label), group_by, meta))
    return _finish("breakhis-manifest", root, records, skipped, filtered, group_by, wanted, verify, name)


def is_breakhis_manifest(columns: list[str]) -> bool:
    return all(c in columns for c in MANIFEST_COLUMNS)
