"""DICOM input: decoding real BUSI pixels written in every supported form, frames, ultrasound regions,
bad files, readers (groups by hashed patient, frames as records), predict, and de-identification
of every output of a run (summary, split, train, predict, evaluate, web)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLossless

from badinput import rle_bad_offset
from breastvision.cli import main
from breastvision.data import dicom
from breastvision.data.io import BadImageError, load_image, read_header
from breastvision.data.readers import read_dataset
from breastvision.data.splits import make_split
from dicom_factory import SENTINELS, make_dicom

# Lossless encodings decode exactly. YBR → RGB rounds (±1); 4:2:2 averages chroma over pixel pairs
# and JPEG is lossy, so those are held to a mean error and a PSNR instead.
EXACT, ROUNDING = 0, 1
LOSSY_MEAN, LOSSY_PSNR = 3.0, 30.0


@pytest.fixture(scope="module")
def busi_grey(busi_dir: Path) -> list[np.ndarray]:
    """Three real BUSI scans as 8-bit grey, even width (4:2:2 pairs pixels), one per class."""
    out = []
    for name in ("benign", "malignant", "normal"):
        path = sorted(p for p in (busi_dir / name).glob("*.png") if "_mask" not in p.name)[0]
        grey = np.asarray(Image.open(path).convert("L"))
        out.append(grey[:, : grey.shape[1] // 2 * 2])
    return out


def _colour(grey: np.ndarray) -> np.ndarray:
    """A colour image with the scan's structure in every channel and real chroma (not grey)."""
    return np.stack([grey, np.roll(grey, 9, axis=1), 255 - grey], axis=-1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


CASES = {
    # name: (colour?, make_dicom options, check)
    "monochrome2_8bit": (False, {}, EXACT),
    "monochrome1_8bit": (False, {"photometric": "MONOCHROME1"}, EXACT),
    "monochrome2_rle": (False, {"encoding": "rle"}, EXACT),
    "monochrome2_jpeg2000": (False, {"encoding": "jpeg2000"}, EXACT),
    "monochrome2_jpeg_baseline": (False, {"encoding": "jpeg"}, "lossy"),
    "rgb": (True, {"photometric": "RGB"}, EXACT),
    "rgb_rle": (True, {"photometric": "RGB", "encoding": "rle"}, EXACT),
    "rgb_jpeg2000": (True, {"photometric": "RGB", "encoding": "jpeg2000"}, EXACT),
    "ybr_full": (True, {"photometric": "YBR_FULL"}, ROUNDING),
    "ybr_full_422": (True, {"photometric": "YBR_FULL_422"}, "lossy"),
    "ybr_full_422_jpeg_baseline": (True, {"photometric": "YBR_FULL_422", "encoding": "jpeg"}, "lossy"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decodes_real_pixels(case: str, busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    colour, options, check = CASES[case]
    grey = busi_grey[0]
    expected = _colour(grey) if colour else np.stack([grey] * 3, axis=-1)
    stored = expected if colour else (255 - grey if options.get("photometric") == "MONOCHROME1" else grey)
    path = make_dicom(tmp_path / f"{case}.dcm", stored, **options)

    header = read_header(path)
    image = load_image(path)
    assert (header.width, header.height, header.format) == (grey.shape[1], grey.shape[0], "DICOM")
    assert header.mode == ("RGB" if colour else "L") and image.mode == "RGB"
    error = np.abs(np.asarray(image).astype(int) - expected.astype(int))
    if check == "lossy":
        assert error.mean() <= LOSSY_MEAN and _psnr(np.asarray(image), expected) >= LOSSY_PSNR
    else:
        assert error.max() <= check


def test_16bit_window_and_min_max(busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    """A 14-bit scan: its VOI window maps it back to the 8-bit source exactly; a narrower window
    clips; MONOCHROME1 inverts after the window; without a window the min–max rule applies."""
    grey = busi_grey[1]
    deep = grey.astype(np.uint16) * 40 + 1000  # 1000 … 11200
    low, high = 1000 + 40 * int(grey.min()), 1000 + 40 * int(grey.max())
    exact = {"bits_stored": 14, "window": ((low + high) / 2, high - low), "voi_function": "LINEAR_EXACT"}
    scale = 255 / (int(grey.max()) - int(grey.min()))
    stretched = np.round((grey.astype(float) - grey.min()) * scale)

    windowed = np.asarray(load_image(make_dicom(tmp_path / "w.dcm", deep, **exact)))[..., 0]
    assert np.abs(windowed.astype(int) - stretched).max() <= ROUNDING

    default = np.asarray(load_image(make_dicom(tmp_path / "n.dcm", deep, bits_stored=14)))[..., 0]
    assert np.abs(default.astype(int) - stretched).max() <= ROUNDING

    narrow = {"bits_stored": 14, "window": (6100, 2000)}  # 5100 … 7100: most of the scan clips
    clipped = np.asarray(load_image(make_dicom(tmp_path / "c.dcm", deep, **narrow)))[..., 0]
    assert (clipped[deep <= 5100] == 0).all() and (clipped[deep > 7100] == 255).all()

    inverted = np.asarray(load_image(make_dicom(tmp_path / "i.dcm", deep, photometric="MONOCHROME1",
                                                **narrow)))[..., 0]
    assert np.array_equal(inverted, 255 - clipped)


@pytest.mark.parametrize("encoding", ["native", "rle", "jpeg"])
def test_multi_frame_each_frame(encoding: str, busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    frames = np.stack([busi_grey[0], busi_grey[0][::-1], np.roll(busi_grey[0], 40, axis=1)])
    path = make_dicom(tmp_path / "cine.dcm", frames, encoding=encoding)
    assert dicom.read_info(path).frames == 3
    for k in (1, 2, 3):
        decoded = np.asarray(load_image(dicom.frame_path(path, k)))[..., 0]
        error = np.abs(decoded.astype(int) - frames[k - 1].astype(int))
        assert (error.mean() <= LOSSY_MEAN) if encoding == "jpeg" else (error.max() == 0)
    with pytest.raises(BadImageError, match=r"multi-frame DICOM \(3 frames\): name one as cine.dcm#frame=K"):
        load_image(path)
    with pytest.raises(BadImageError, match="frame 4 asked for, but the file has 3"):
        read_header(dicom.frame_path(path, 4))


def test_ultrasound_region_crop_and_spacing(busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    grey = busi_grey[2]
    regions = [
        {"box": (10, 5, 109, 84)},  # 100 × 80, the smaller 2D region
        {"box": (40, 30, 239, 179), "delta_cm": 0.02},  # 200 × 150: the B-mode picture
        {"box": (0, 0, grey.shape[1] - 1, grey.shape[0] - 1), "spatial_format": 3},  # a spectral strip
    ]
    path = make_dicom(tmp_path / "regions.dcm", grey, regions=regions)
    info = dicom.read_info(path)
    assert (info.width, info.height, info.region) == (200, 150, (40, 30, 240, 180))
    assert info.spacing_mm == pytest.approx((0.2, 0.2))
    assert np.array_equal(np.asarray(load_image(path))[..., 0], grey[30:180, 40:240])


def test_pydicom_bundled_files() -> None:
    """Files made by other tools: one MR image stored three ways decodes identically (16-bit signed,
    windowed); a palette-colour ultrasound; a 2-frame RGB RLE file; a structured report."""
    reference = np.asarray(load_image(get_testdata_file("MR_small.dcm")))
    for variant in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"):
        assert np.array_equal(np.asarray(load_image(get_testdata_file(variant))), reference)
    assert reference.std() > 10
    scan = get_testdata_file("examples_palette.dcm")  # a real ultrasound scan, palette colour
    info = dicom.read_info(scan)
    assert info.region == (120, 60, 800, 350) and info.spacing_mm == pytest.approx((0.2623, 0.2623), abs=1e-4)
    palette = np.asarray(load_image(scan))
    assert palette.shape == (290, 680, 3) and len(np.unique(palette.reshape(-1, 3), axis=0)) > 50
    two = get_testdata_file("SC_rgb_rle_2frame.dcm")
    first, second = (np.asarray(load_image(dicom.frame_path(two, k))) for k in (1, 2))
    assert not np.array_equal(first, second)
    with pytest.raises(BadImageError, match="no pixel data"):
        read_header(get_testdata_file("reportsi.dcm"))


def _patched_syntax(source: Path, target: Path, old: str, new: str) -> Path:
    assert len(old) == len(new)
    data = source.read_bytes()
    assert data.count(old.encode()) == 1
    target.write_bytes(data.replace(old.encode(), new.encode()))
    return target


def _bad_files(folder: Path, grey: np.ndarray) -> dict[str, tuple[Path, str]]:
    """Bad inputs and the reason each must give."""
    good = make_dicom(folder / "good.dcm", grey)
    no_pixels = Dataset()
    no_pixels.file_meta = dcmread(good).file_meta
    no_pixels.PatientName, no_pixels.Modality = SENTINELS["PatientName"], "US"
    no_pixels.save_as(folder / "nopixels.dcm", enforce_file_format=True)
    truncated = folder / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    (folder / "text.dcm").write_text("not a DICOM file at all, though named like one")
    rle = make_dicom(folder / "rle.dcm", grey, encoding="rle").read_bytes()
    (folder / "cut_rle.dcm").write_bytes(rle[: len(rle) * 4 // 5])
    (folder / "bad_rle.dcm").write_bytes(rle_bad_offset())
    (folder / "rle.dcm").unlink()
    cases = {
        "no pixel data": (folder / "nopixels.dcm", "DICOM file has no pixel data"),
        "unknown transfer syntax": (
            _patched_syntax(good, folder / "unknown.dcm", "1.2.840.10008.1.2.1", "1.2.840.99999.9.9.9"),
            "unknown or unsupported DICOM transfer syntax UID 1.2.840.99999.9.9.9",
        ),
        "truncated": (truncated, "truncated DICOM file"),
        "not DICOM": (folder / "text.dcm", r"not a DICOM file \(no 'DICM' marker at byte 128\)"),
        "cut in compressed data": (folder / "cut_rle.dcm", r"truncated DICOM file \(it ends inside"),
        "corrupt compressed data": (folder / "bad_rle.dcm", "corrupt or truncated DICOM pixel data .*RLE"),
    }
    bomb = dcmread(make_dicom(folder / "bomb.dcm", grey, encoding="rle"))
    bomb.Rows = bomb.Columns = 20000  # 400 megapixels from a few hundred kilobytes
    bomb.save_as(folder / "bomb.dcm")
    cases["decompression bomb"] = (folder / "bomb.dcm", r"possible decompression bomb \(20000×20000 pixels\)")
    if not get_decoder(JPEGLossless).is_available:
        jpeg = make_dicom(folder / "jpeg.dcm", grey, encoding="jpeg")
        cases["no decoder installed"] = (
            _patched_syntax(jpeg, folder / "lossless.dcm", "1.2.840.10008.1.2.4.50", JPEGLossless),
            "no decoder installed for DICOM transfer syntax JPEG Lossless.*pylibjpeg-libjpeg",
        )
    good.unlink()
    return cases


def test_bad_inputs_give_one_line_reasons(
    busi_grey: list[np.ndarray], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name, (path, reason) in _bad_files(tmp_path, busi_grey[0]).items():
        with pytest.raises(BadImageError, match=reason) as caught:
            load_image(path)
        assert "\n" not in str(caught.value), name
    # pydicom logs what it met (values included) on damaged files: none of it is let through.
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]


def test_web_pixel_limit_counts_stored_pixels(
    busi_grey: list[np.ndarray], make_model_file, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from breastvision.serving.web import create_app

    grey = busi_grey[0]
    path = make_dicom(tmp_path / "scan.dcm", grey, regions=[{"box": (0, 0, 99, 99)}])
    # The limit counts the stored pixels that would be decoded, not the smaller region kept.
    client = TestClient(create_app(make_model_file(), max_pixels=grey.size - 1))
    answer = client.post("/api/predict", files={"file": ("scan.dcm", path.read_bytes())})
    assert answer.status_code == 413 and "over the limit" in answer.json()["detail"]
    client = TestClient(create_app(make_model_file(), max_pixels=grey.size))
    answer = client.post("/api/predict", files={"file": ("scan.dcm", path.read_bytes())})
    assert answer.status_code == 200 and answer.json()["image"]["width"] == 100


def _tree(root: Path, grey: list[np.ndarray]) -> Path:
    """Class folders of DICOMs: patients P0 (two files), P1, P2; a study without a patient ID; a
    3-frame cine of P3; and a file without pixel data."""
    for name in ("benign", "malignant"):
        (root / name).mkdir(parents=True)
    make_dicom(root / "benign" / "a.dcm", grey[0], patient_id="P0")
    make_dicom(root / "malignant" / "b.dcm", grey[1], patient_id="P0", encoding="rle")
    make_dicom(root / "benign" / "c.dcm", _colour(grey[2]), photometric="RGB", patient_id="P1")
    make_dicom(root / "malignant" / "d.dcm", grey[2], patient_id="P2", encoding="jpeg")
    make_dicom(root / "benign" / "e.dcm", grey[1], patient_id="", study_uid="1.2.3.4.5")
    make_dicom(root / "malignant" / "cine.dcm", np.stack([grey[1]] * 3), patient_id="P3")
    ds = dcmread(root / "benign" / "a.dcm")
    del ds.PixelData
    ds.save_as(root / "benign" / "nopixels.dcm")
    return root


def test_class_tree_groups_by_patient_and_lists_frames(busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    catalog = read_dataset(_tree(tmp_path / "tree", busi_grey), verify=True)
    names = [catalog.relpath(r) for r in catalog.records]
    assert names == ["benign/a.dcm", "benign/c.dcm", "benign/e.dcm", "malignant/b.dcm",
                     "malignant/cine.dcm#frame=1", "malignant/cine.dcm#frame=2",
                     "malignant/cine.dcm#frame=3", "malignant/d.dcm"]
    group = {name: r.group for name, r in zip(names, catalog.records, strict=True)}
    assert group["benign/a.dcm"] == group["malignant/b.dcm"] == dicom._hash("patient", "P0")
    assert len({group[f"malignant/cine.dcm#frame={k}"] for k in (1, 2, 3)}) == 1
    assert group["benign/e.dcm"].startswith("study:") and len(set(group.values())) == 5
    assert catalog.grouping == "patient_or_study" and catalog.meta["notes"]
    assert [r.meta["frame"] for r in catalog.records][4:7] == [1, 2, 3]
    assert [(s.path.name, s.reason.split(" (")[0]) for s in catalog.skipped] == [
        ("nopixels.dcm", "DICOM file has no pixel data")
    ]
    with pytest.raises(Exception, match="near-duplicate grouping would replace them"):
        read_dataset(tmp_path / "tree", near_duplicates=True)


def test_split_never_separates_a_patient(busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    catalog = read_dataset(_tree(tmp_path / "tree", busi_grey))
    for seed in range(5):
        split = make_split(catalog, "group_holdout", seed, fractions=[0.5, 0.25, 0.25])
        part_of_group: dict[str, set[str]] = {}
        for part in ("train", "val", "test"):
            for item in split.subset(catalog, part):
                part_of_group.setdefault(item.record.group, set()).add(part)
        assert all(len(parts) == 1 for parts in part_of_group.values())


def test_manifest_rows_name_frames(busi_grey: list[np.ndarray], tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", busi_grey)
    (root / "manifest.csv").write_text(
        "path,label\nbenign/a.dcm,benign\nmalignant/cine.dcm#frame=2,malignant\nmalignant/d.dcm,malignant\n"
    )
    catalog = read_dataset(root / "manifest.csv")
    assert [catalog.relpath(r) for r in catalog.records] == ["benign/a.dcm", "malignant/cine.dcm#frame=2",
                                                               "malignant/d.dcm"]
    assert catalog.grouping == "patient"
    unlisted = {s.path.name for s in catalog.skipped if "not listed" in s.reason}
    assert "cine.dcm" not in unlisted and "b.dcm" in unlisted
    (root / "manifest.csv").write_text("path,label,group\nbenign/a.dcm,benign,x\nmalignant/b.dcm,malignant,y")
    given = read_dataset(root / "manifest.csv")
    assert given.grouping == "group" and [r.group for r in given.records] == ["x", "y"]


def test_predict_frames(busi_grey: list[np.ndarray], make_model_file, tmp_path: Path) -> None:
    root = _tree(tmp_path / "tree", busi_grey)
    model = make_model_file()
    assert main(["predict", str(model), str(root / "malignant"), "--out", str(tmp_path / "all.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "all.csv").open()))
    assert [r["path"] for r in rows if not r["skipped"]] == [
        "malignant/b.dcm", "malignant/cine.dcm#frame=1", "malignant/cine.dcm#frame=2",
        "malignant/cine.dcm#frame=3", "malignant/d.dcm"]
    out = tmp_path / "two.csv"
    assert main(["predict", str(model), str(root / "malignant"), "--frame", "2", "--out", str(out)]) == 0
    chosen = [r["path"] for r in csv.DictReader(out.open())]
    assert chosen == ["malignant/b.dcm", "malignant/cine.dcm#frame=2", "malignant/d.dcm"]
    one = f"{root / 'malignant' / 'cine.dcm'}#frame=3"
    assert main(["predict", str(model), one, "--out", str(tmp_path / "one.json")]) == 0
    assert [p["path"] for p in json.loads((tmp_path / "one.json").read_text())["predictions"]] == [one]
    assert main(["predict", str(model), str(root), "--frame", "0"]) == 2


def _sentinel_strings() -> list[str]:
    words = {v for v in SENTINELS.values()}
    words |= {part for v in SENTINELS.values() for part in v.replace("^", " ").split() if len(part) > 5}
    return sorted(words)


@pytest.mark.slow
def test_no_patient_attribute_reaches_any_output(
    busi_grey: list[np.ndarray], tmp_path: Path, capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every output of a run on DICOMs with sentinel identifiers: summary, split, training run
    (model file included), predict, evaluate, the web answers; and everything printed or logged."""
    from fastapi.testclient import TestClient

    from breastvision.serving.web import create_app

    caplog.set_level(logging.DEBUG)
    root = tmp_path / "dicoms"
    for label, name in enumerate(("benign", "malignant", "normal")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.roll(busi_grey[label], 25 * i, axis=1)
            style = [{}, {"encoding": "rle"}, {"photometric": "RGB"}, {"encoding": "jpeg"}][i]
            pixels = _colour(pixels) if style.get("photometric") else pixels
            patient = f"{SENTINELS['PatientID']}-{label}{i}"
            make_dicom(root / name / f"{name}{i}.dcm", pixels, patient_id=patient, **style)
    make_dicom(root / "normal" / "cine.dcm", np.stack([busi_grey[2]] * 2))
    _bad_files(root / "benign", busi_grey[0])
    out = tmp_path / "out"
    config = out / "tiny.yaml"
    out.mkdir()
    config.write_text(json.dumps({
        "name": "tiny", "output_dir": str(out / "runs"),
        "data": {"source": str(root), "input_size": 32, "resize": 36, "options": {"verify": True},
                 "split": {"protocol": "group_holdout", "options": {"fractions": [0.5, 0.25, 0.25]}}},
        # Only the classifier trains: last.ckpt holds no optimizer state for the backbone.
        "model": {"name": "resnet18", "first_trainable_stage": "head"},
        "train": {"epochs": 1, "batch_size": 4, "cache_dir": None, "progress": "none"},
    }))
    run = out / "run"
    commands = [
        ["--verbose", "data", "summary", str(root), "--json", str(out / "summary.json")],
        ["--verbose", "data", "split", str(root), "--fractions", "0.5,0.25,0.25",
         "--out", str(out / "split.json")],
        ["--verbose", "train", str(config), "--out", str(run)],
        ["--verbose", "predict", str(run / "model.safetensors"), str(root), "--out", str(out / "p.csv")],
        ["--verbose", "predict", str(run / "model.safetensors"), str(root), "--out", str(out / "p.json")],
        ["--verbose", "evaluate", str(run / "model.safetensors"), str(root), "--out", str(out / "eval"),
         "--n-resamples", "20"],
    ]
    for command in commands:
        assert main(command) == 0, command
    client = TestClient(create_app(run / "model.safetensors"))
    answers = [client.get("/api/model").text, client.get("/healthz").text]
    for path in ("benign/benign1.dcm", "normal/cine.dcm", "benign/nopixels.dcm"):
        form = {"explain": "true", "frame": "2" if "cine" in path else "1"}
        answers.append(client.post("/api/predict", files={"file": ("x.dcm", (root / path).read_bytes())},
                                   data=form).text)
    cine = (root / "normal" / "cine.dcm").read_bytes()
    beyond = client.post("/api/predict", files={"file": ("x.dcm", cine)}, params={"frame": 3})
    answers.append(beyond.text)
    assert beyond.status_code == 400 and "frame 3 asked for, but the file has 2" in beyond.text
    assert json.loads(answers[3])["image"] | {"preview": ""} == {
        "width": busi_grey[2].shape[1], "height": busi_grey[2].shape[0], "format": "DICOM", "frames": 2,
        "frame": 2, "spacing_mm": None, "preview": ""}
    assert "no pixel data" in answers[4]
    assert json.loads(answers[2])["predicted_class"] in ("benign", "malignant", "normal")
    summary = json.loads((out / "summary.json").read_text())[0]
    # normal/benign/malignant folders of DICOM files: the user's own data, grouped by patient.
    assert (summary["format"], summary["grouping"]) == ("class-folders", "patient")

    printed = capfd.readouterr()
    texts = {"stdout": printed.out, "stderr": printed.err, "log": caplog.text, "web": "\n".join(answers)}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.safetensors", "predictions.csv", "report.md", "summary.json"}
    assert "benign/benign1.dcm" in (out / "p.csv").read_text()
    leaks = [(where, word) for where, text in texts.items() for word in _sentinel_strings() if word in text]
    leaks += [(str(p), word) for p in files for word in _sentinel_strings()
              if word.encode() in p.read_bytes()]
    assert not leaks
