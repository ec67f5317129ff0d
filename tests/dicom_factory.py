"""DICOM files made from real pixels, for tests and for DICOM evaluations of BUSI.

Every file carries sentinel patient and institution attributes (:data:`SENTINELS`), so a test can
assert that none of them reaches any output. Run as a script to convert BUSI images into a
class-per-folder tree of DICOM files:

    python tests/dicom_factory.py ../shared/data/busi/Dataset_BUSI_with_GT OUT --per-class 12
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

#: Identifying values written into every file; none may appear in any output.
SENTINELS = {
    "PatientName": "Sentinelpatient^Zyxwvu",
    "PatientID": "SENTINEL-MRN-4711",
    "InstitutionName": "Sentinel Institution Qwerty",
    "ReferringPhysicianName": "Sentineldoctor^Plugh",
    "PatientBirthDate": "19010203",
    "InstitutionAddress": "1 Sentinel Road Xyzzy",
    "AccessionNumber": "SENTACC9876",
}


def _dataset(patient_id: str, study_uid: str | None, frames: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop_class = UltrasoundMultiFrameImageStorage if frames > 1 else UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "US"
    for key, value in SENTINELS.items():
        setattr(ds, key, value)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    return ds


def _ybr_422(rgb: np.ndarray) -> bytes:
    """Native YBR_FULL_422: per pair of pixels Y1 Y2 Cb Cr, the chroma averaged over the pair."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    y = ybr[..., 0]
    chroma = ybr[..., 1:].reshape(rgb.shape[0], rgb.shape[1] // 2, 2, 2).mean(axis=2)
    out = np.empty((rgb.shape[0], rgb.shape[1] // 2, 4), dtype=np.uint8)
    out[..., 0], out[..., 1] = y[:, 0::2], y[:, 1::2]
    out[..., 2:] = np.round(chroma)
    return out.tobytes()


def _jpeg_frames(frames: np.ndarray, photometric: str) -> list[bytes]:
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        # subsampling=1 is 4:2:2, what YBR_FULL_422 declares.
        options = {"subsampling": 1} if frame.ndim == 3 else {}
        Image.fromarray(frame).save(buffer, format="JPEG", quality=95, **options)
        encoded.append(buffer.getvalue())
    return encoded


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 8,
    encoding: str = "native",
    window: tuple[float, float] | None = None,
    voi_function: str | None = None,
    regions: list[dict] | None = None,
    patient_id: str = SENTINELS["PatientID"],
    study_uid: str | None = None,
) -> Path:
    """Write ``pixels`` (rows×cols[×3], or frames×rows×cols[×3] for a cine) as a DICOM file.

    ``encoding``: ``native`` (Explicit VR Little Endian), ``rle``, ``jpeg2000`` (lossless, via
    pylibjpeg-openjpeg) or ``jpeg`` (JPEG Baseline from Pillow, encapsulated). RGB pixels are
    converted to YBR_FULL / YBR_FULL_422 when that is the photometric interpretation asked for.
    """
    colour = pixels.shape[-1] == 3 and pixels.ndim >= 3
    frames = pixels.shape[0] if pixels.ndim == (4 if colour else 3) else 1
    ds = _dataset(patient_id, study_uid, frames)
    if encoding == "jpeg":
        stack = pixels if frames > 1 else pixels[None]
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.Rows, ds.Columns = stack.shape[1:3]
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if colour:
            ds.PlanarConfiguration = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = encapsulate(_jpeg_frames(stack, photometric))
        ds["PixelData"].VR = "OB"
    elif photometric == "YBR_FULL_422":
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_pixel_data(pixels, "RGB", 8)
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = _ybr_422(pixels)
    else:
        stored = convert_color_space(pixels, "RGB", "YBR_FULL") if photometric == "YBR_FULL" else pixels
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_pixel_data(stored, photometric, bits_stored)
        if encoding == "rle":
            ds.compress("1.2.840.10008.1.2.5", encoding_plugin="pydicom")
        elif encoding == "jpeg2000":
            ds.compress("1.2.840.10008.1.2.4.90")
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if regions:
        ds.SequenceOfUltrasoundRegions = [_region(**r) for r in regions]
    ds.save_as(path, enforce_file_format=True)
    return path


def _region(box: tuple[int, int, int, int], spatial_format: int = 1, delta_cm: float = 0.01) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = spatial_format, 1, 0
    left, top, right, bottom = box
    item.RegionLocationMinX0, item.RegionLocationMinY0 = left, top
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = right, bottom
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX = item.PhysicalDeltaY = delta_cm
    return item


def busi_images(busi: Path, per_class: int) -> list[tuple[str, Path]]:
    """The first ``per_class`` BUSI images (masks left out) of each class, in name order."""
    found = []
    for name in ("benign", "malignant", "normal"):
        files = sorted(p for p in (busi / name).glob("*.png") if "_mask" not in p.name)
        found.extend((name, p) for p in files[:per_class])
    return found


def convert_busi(busi: Path, out: Path, per_class: int) -> list[Path]:
    """A class-per-folder DICOM tree from BUSI, cycling through encodings and interpretations;
    each source image is its own patient (a distinct sentinel-prefixed Patient ID)."""
    styles = [
        {"photometric": "MONOCHROME2"},
        {"photometric": "MONOCHROME2", "encoding": "rle"},
        {"photometric": "RGB", "encoding": "jpeg2000"},
        {"photometric": "YBR_FULL_422", "encoding": "jpeg"},
    ]
    written = []
    for i, (label, source) in enumerate(busi_images(busi, per_class)):
        style = styles[i % len(styles)]
        rgb = np.asarray(Image.open(source).convert("RGB"))
        if style["photometric"] == "YBR_FULL_422":
            rgb = rgb[:, : rgb.shape[1] // 2 * 2]  # 4:2:2 pairs pixels: an even width
        pixels = rgb[..., 0] if style["photometric"].startswith("MONO") else rgb
        (out / label).mkdir(parents=True, exist_ok=True)
        target = out / label / f"{source.stem.replace(' ', '_').replace('(', '').replace(')', '')}.dcm"
        written.append(make_dicom(target, pixels, patient_id=f"{SENTINELS['PatientID']}-{i}", **style))
    return written


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="convert BUSI images into a DICOM class-folder tree")
    parser.add_argument("busi", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=12)
    args = parser.parse_args()
    print(f"wrote {len(convert_busi(args.busi, args.out, args.per_class))} DICOM files to {args.out}")
