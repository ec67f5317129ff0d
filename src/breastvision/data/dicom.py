"""DICOM images (ultrasound above all): decoded to the same RGB image as ``data.io.load_image``.

``data.io`` hands a file here when its name ends in ``.dcm`` / ``.dicom`` or it holds the ``DICM``
marker at byte 128 (DICOM Part 10); every problem becomes a ``BadImageError`` with a reason.

Choices recorded here:

- **Decoders.** pydicom reads the file; pixel data goes through ``pydicom.pixels``. Uncompressed
  and Deflated data need nothing more; JPEG Baseline (what ultrasound scanners mostly send) is
  decoded by Pillow; ``pylibjpeg-openjpeg`` adds JPEG 2000 at any depth and HTJ2K, and
  ``pylibjpeg-rle`` a compiled RLE decoder (all MIT). JPEG Lossless and JPEG-LS need
  ``pylibjpeg-libjpeg`` (GPL-3.0, so only the optional extra ``dicom-lossless`` of this
  Apache-2.0 package) or ``python-gdcm``; without one such a file is a listed skip that names
  what to install, as is a transfer syntax pydicom does not know.
- **Pixels → 8-bit RGB.** YBR_FULL and YBR_FULL_422 are converted to RGB (``convert_color_space``,
  done by ``pixel_array``), PALETTE COLOR through its lookup table. Grey images pass the Modality
  LUT (rescale slope / intercept), then the first VOI LUT or window when the file has one, scaled
  from that transform's full output range to 0–255; without one, 8-bit values are kept as stored
  and deeper ones are min–max stretched (the rule of ``data.io``). MONOCHROME1 is inverted last,
  so that 0 is always black.
- **Frames.** A multi-frame (cine) file is one image per frame. Frames are numbered from 1, as
  DICOM numbers them (Referenced Frame Number), and addressed as ``file.dcm#frame=K``
  (:func:`frame_path`); dataset readers and ``predict`` list every frame under that name, a
  manifest row may name one, and loading a bare multi-frame path is refused (the caller must say
  which frame), so every output names the frame it scored.
- **Ultrasound regions.** When the file has a Sequence of Ultrasound Regions, the image is cropped
  to the largest region whose spatial format is 2D (the B-mode picture): the scanner's text,
  scales and thumbnails around it — where burnt-in patient details sit — never reach the model.
  That region's physical spacing (mm per pixel, when its units are cm) is recorded in
  :class:`DicomInfo`; without regions, Pixel Spacing is used when present.
- **Groups and de-identification.** Patient and institution attributes are never copied anywhere.
  The only identifiers read are Patient ID and, without it, Study Instance UID, and only to form
  the group (``patient:`` / ``study:`` + 16 hex digits of a SHA-256), so one patient's images
  never straddle a split. Such a hash is a pseudonym, not anonymity: a short medical record
  number can be found again by trying every candidate. pydicom's warnings while reading and its
  log messages (which may quote element values) are not passed on; outputs name an image by its
  file name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from breastvision.data.io import MIN_SIDE, BadImageError, file_problem, stretch_to_8bit

#: File extensions of DICOM files (lower case); other names are recognised by their marker.
DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})
#: How a path names one frame of a multi-frame file: ``cine.dcm#frame=3`` (frames count from 1).
FRAME_MARK = "#frame="
_FRAME_RE = re.compile(re.escape(FRAME_MARK) + r"(\d+)$")
_PREAMBLE = 128
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
# Region Spatial Format 1 = 2D (tissue or colour flow); Physical Units 3 = cm (PS3.3 C.8.5.5.1).
_REGION_2D, _UNITS_CM = 1, 3
# What pydicom raises on a damaged or unusual file (its own errors derive from these; a missing or
# malformed attribute surfaces as AttributeError / KeyError / TypeError deep inside it).
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, AttributeError, TypeError, IndexError,
                NotImplementedError, RuntimeError)



@contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """pydicom's warnings caught, never shown: the caller may read them, none is passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@dataclass(frozen=True)
class DicomInfo:
    """What a DICOM file holds, without any patient or institution attribute.

    ``width`` / ``height`` are after the ultrasound-region crop; ``region`` is that crop as
    (left, top, right, bottom) in stored pixels, ``stored_size`` (columns, rows) what is decoded;
    ``spacing_mm`` is (row, column) spacing.
    """

    width: int
    height: int
    stored_size: tuple[int, int]
    frames: int
    photometric: str
    bits_stored: int
    transfer_syntax: str
    group: str | None
    region: tuple[int, int, int, int] | None
    spacing_mm: tuple[float, float] | None

    @property
    def mode(self) -> str:
        return "L" if self.photometric in _GREY else "RGB"

    def meta(self) -> dict[str, Any]:
        """Fields fit for ``Record.meta`` and reports (the group is kept out: it is the record's)."""
        return {f"dicom_{k}": v for k, v in asdict(self).items() if k not in ("width", "height", "group")}


def split_frame(path: str | os.PathLike) -> tuple[Path, int | None]:
    """The file a path names and the frame it selects (None: the path names the whole file)."""
    text = os.fspath(path)
    match = _FRAME_RE.search(text)
    if match is None:
        return Path(text), None
    return Path(text[: match.start()]), int(match.group(1))


def frame_path(path: str | os.PathLike, frame: int) -> Path:
    """The name of frame ``frame`` (from 1) of a multi-frame file."""
    return Path(f"{os.fspath(path)}{FRAME_MARK}{frame}")


def is_dicom(path: str | os.PathLike) -> bool:
    """A DICOM extension (frame suffix allowed), or the ``DICM`` marker of a Part 10 file."""
    file, frame = split_frame(path)
    if frame is not None or file.suffix.lower() in DICOM_EXTENSIONS:
        return True
    if not file.is_file():  # opening a FIFO would block; data.io names what else it is
        return False
    try:
        with open(file, "rb") as handle:
            handle.seek(_PREAMBLE)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _one_line(err: Exception) -> str:
    # pydicom lists each decoder plugin's failure on its own line; a reason is one line.
    return " ".join(f"{type(err).__name__}: {err}".split())


def _hash(kind: str, value: Any) -> str:
    return f"{kind}:{hashlib.sha256(f'breastvision-dicom:{value}'.encode()).hexdigest()[:16]}"


def _group(ds: Any) -> str | None:
    patient = str(ds.get("PatientID", "") or "").strip()
    if patient:
        return _hash("patient", patient)
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    return _hash("study", study) if study else None


def _read(file: Path) -> Any:
    """The dataset with its large values (pixel data) left on disk: a cine loop can be gigabytes."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    # pydicom logs what it warns about, element values included, to "pydicom" and its children.
    # Above CRITICAL no record is even made; set after pydicom's import, which sets WARNING.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)

    # As data.io does for every image: a FIFO would block the reader, links get their own reasons.
    problem = file_problem(file)
    if problem is not None:
        raise BadImageError(problem, file)
    if file.stat().st_size == 0:
        raise BadImageError("empty file (0 bytes)", file)
    try:
        with _quiet() as caught:
            ds = pydicom.dcmread(file, defer_size="64 KB")
    except InvalidDicomError:
        raise BadImageError("not a DICOM file (no 'DICM' marker at byte 128)", file) from None
    except _READ_ERRORS as err:
        raise BadImageError(f"unreadable DICOM file ({_one_line(err)})", file) from None
    if any(str(w.message).startswith("End of file reached") for w in caught):
        # pydicom keeps what it read of a file cut short inside encapsulated (compressed) pixel data.
        raise BadImageError("truncated DICOM file (it ends inside its compressed pixel data)", file)
    return ds


def _check_decodable(ds: Any, file: Path) -> str:
    """The transfer syntax UID, once it is known that pixel data exist and can be decoded."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise BadImageError(
            "DICOM file has no pixel data (a report or structured document, or a file cut short before it)",
            file,
        )
    raw = ds.get_item("PixelData", keep_deferred=True)
    length = getattr(raw, "length", 0xFFFFFFFF)
    if length != 0xFFFFFFFF and raw.value_tell + length > file.stat().st_size:
        # Found from the header: a file cut short inside uncompressed (defined-length) pixel data.
        raise BadImageError(f"truncated DICOM file (pixel data needs {length:,} bytes, fewer are left)", file)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if not syntax:
        raise BadImageError("DICOM file does not state its transfer syntax", file)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise BadImageError(f"unknown or unsupported DICOM transfer syntax UID {syntax}", file) from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise BadImageError(f"no decoder installed for DICOM transfer syntax {syntax.name} ({needs})", file)
    return str(syntax)


def _region(ds: Any, rows: int, columns: int) -> tuple[tuple[int, int, int, int] | None, tuple | None]:
    """The crop box of the largest 2D ultrasound region and its spacing (see module docstring)."""
    best, best_area = None, 0
    for item in ds.get("SequenceOfUltrasoundRegions", []):
        if int(item.get("RegionSpatialFormat", 0)) != _REGION_2D:
            continue
        try:
            # The Max coordinates are inclusive (PS3.3 C.8.5.5.1.1).
            left, top = max(0, int(item.RegionLocationMinX0)), max(0, int(item.RegionLocationMinY0))
            right = min(columns, int(item.RegionLocationMaxX1) + 1)
            bottom = min(rows, int(item.RegionLocationMaxY1) + 1)
        except AttributeError:
            continue
        area = (right - left) * (bottom - top)
        if right - left >= MIN_SIDE and bottom - top >= MIN_SIDE and area > best_area:
            best, best_area = (item, (left, top, right, bottom)), area
    if best is None:
        spacing = ds.get("PixelSpacing")
        return None, (float(spacing[0]), float(spacing[1])) if spacing and len(spacing) == 2 else None
    item, box = best
    units = (int(item.get("PhysicalUnitsXDirection", 0)), int(item.get("PhysicalUnitsYDirection", 0)))
    if units == (_UNITS_CM, _UNITS_CM) and "PhysicalDeltaX" in item and "PhysicalDeltaY" in item:
        return box, (float(item.PhysicalDeltaY) * 10, float(item.PhysicalDeltaX) * 10)
    return box, None


def _info(ds: Any, file: Path) -> DicomInfo:
    syntax = _check_decodable(ds, file)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GREY | _COLOUR:
        raise BadImageError(f"unsupported DICOM photometric interpretation '{photometric or 'none'}'", file)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames, bits = int(ds.get("NumberOfFrames", 1) or 1), int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError) as err:
        raise BadImageError(f"DICOM image attributes missing or invalid ({err})", file) from None
    if rows * columns > Image.MAX_IMAGE_PIXELS:
        # Pillow's bomb limit, as data.io applies it: compressed frames can inflate far beyond the file.
        raise BadImageError(f"refused as a possible decompression bomb ({columns}×{rows} pixels)", file)
    region, spacing = _region(ds, rows, columns)
    left, top, right, bottom = region or (0, 0, columns, rows)
    width, height = right - left, bottom - top
    if min(width, height) < MIN_SIDE:
        raise BadImageError(
            f"image is {width}×{height} pixels, below the {MIN_SIDE}-pixel minimum side", file
        )
    return DicomInfo(width, height, (columns, rows), frames, photometric, bits, syntax, _group(ds), region,
                     spacing)


def read_info(path: str | os.PathLike) -> DicomInfo:
    """Header facts of a DICOM file (a ``#frame=K`` suffix is checked against the frame count)."""
    file, frame = split_frame(path)
    info = _info(_read(file), file)
    _check_frame(info, frame, file)
    return info


def _check_frame(info: DicomInfo, frame: int | None, file: Path) -> None:
    if frame is not None and not 1 <= frame <= info.frames:
        raise BadImageError(f"frame {frame} asked for, but the file has {info.frames} (counted from 1)", file)


def _voi_range(values: np.ndarray, ds: Any) -> tuple[float, float]:
    """The output range of the file's VOI transform, found by passing it the input's extremes."""
    from pydicom.pixels import apply_voi_lut

    if np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(values.dtype)
        probe = np.array([info.min, info.max], dtype=values.dtype)
    else:
        probe = np.array([-1e30, 1e30])
    low, high = apply_voi_lut(probe, ds, index=0)
    return float(low), float(high)


def _grey_to_8bit(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        low, high = _voi_range(values, ds)
        shown = apply_voi_lut(values, ds, index=0).astype(np.float64)
        grey = (stretch_to_8bit(shown) if high <= low
                else np.round(np.clip((shown - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8))
    elif int(ds.BitsStored) <= 8 and values.min() >= 0 and values.max() <= 255:
        grey = values.astype(np.uint8)
    else:
        grey = stretch_to_8bit(values)
    return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def _colour_to_8bit(arr: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if ds.PhotometricInterpretation == "PALETTE COLOR":
        # The lookup table's entries fill their own depth (8 or 16 bits), whatever Bits Stored says.
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return np.round(apply_color_lut(arr, ds) * (255.0 / (2**bits - 1))).astype(np.uint8)
    if arr.dtype == np.uint8:
        return arr
    return stretch_to_8bit(arr) if int(ds.BitsStored) > 8 else arr.astype(np.uint8)


def load_dicom(path: str | os.PathLike) -> Image.Image:
    """One frame of a DICOM file as an RGB image (``file.dcm#frame=K``, or a single-frame file)."""
    from pydicom.pixels import pixel_array

    file, frame = split_frame(path)
    ds = _read(file)
    info = _info(ds, file)
    _check_frame(info, frame, file)
    if frame is None and info.frames > 1:
        raise BadImageError(
            f"multi-frame DICOM ({info.frames} frames): name one as {file.name}{FRAME_MARK}K (K from 1)", file
        )
    try:
        with _quiet():
            # From the file, not the dataset: only the frame asked for is read and decoded.
            arr = pixel_array(file, index=(frame or 1) - 1 if info.frames > 1 else None)
            pixels = _grey_to_8bit(arr, ds) if info.mode == "L" else _colour_to_8bit(arr, ds)
    except _READ_ERRORS as err:
        reason = f"corrupt or truncated DICOM pixel data ({_one_line(err)})"
        raise BadImageError(reason, file) from None
    if info.region is not None:
        left, top, right, bottom = info.region
        pixels = pixels[top:bottom, left:right]
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
