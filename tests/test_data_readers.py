"""Readers: real shared data (counts, masks, the 16 BreakHis names) and generated trees (every bad case)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastvision.data import dedup
from breastvision.data.readers import detect_format, read_dataset
from breastvision.data.readers.breakhis import BreakHisNameError, parse_magnification, parse_name
from breastvision.errors import BreastvisionError, DatasetNotFoundError

# ---------------------------------------------------------------- real data


def _classes(catalog) -> dict[str, int]:
    return dict(Counter(catalog.class_names[label] for label in catalog.labels))


@pytest.fixture(scope="module")
def busi(data_root, busi_dir):
    return read_dataset("busi", root=data_root)


def test_busi_counts_and_masks(busi, busi_dir):
    assert busi.class_names == ["normal", "benign", "malignant"]
    assert _classes(busi) == {"normal": 106, "benign": 349, "malignant": 168}
    assert busi.skipped == []
    # Every file in the folders is either a sample or one of its masks.
    files = [p for p in busi_dir.rglob("*.png")]
    masks = [m for r in busi.records for m in r.masks]
    assert len(busi) + len(masks) == len(files)
    assert all("_mask" in m.name for m in masks) and all("_mask" not in r.path.name for r in busi.records)
    for record in busi.records:
        assert record.masks, record.path
        stem = record.path.stem
        assert all(m.parent == record.path.parent and m.name.startswith(f"{stem}_mask") for m in record.masks)
    several = next(r for r in busi.records if r.path.name == "benign (100).png")
    assert [m.name for m in several.masks] == ["benign (100)_mask.png", "benign (100)_mask_1.png"]


def test_busi_near_duplicates(busi):
    near = busi.meta["near_duplicates"]
    assert busi.grouping == "near_duplicate"
    groups = {r.group for r in busi.records}
    assert len(near["groups"]) == sum(g.startswith(dedup.GROUP_PREFIX) for g in groups)
    by_name = {busi.relpath(r): r for r in busi.records}
    # A pair documented as one scan under two labels (checked by eye) must share a group ...
    assert by_name["benign/benign (433).png"].group == by_name["malignant/malignant (145).png"].group
    conflicted = {f for c in near["label_conflicts"] for f in c["files"]}
    assert {"benign/benign (433).png", "malignant/malignant (145).png"} <= conflicted
    # ... and unrelated images must not be chained into a few huge groups.
    assert max(Counter(r.group for r in busi.records).values()) <= 10
    for conflict in near["label_conflicts"]:
        assert len(set(conflict["files"].values())) > 1


def test_busi_rereading_uses_the_hash_cache(data_root, busi_dir, busi):
    start = time.perf_counter()
    again = read_dataset("busi", root=data_root)
    assert time.perf_counter() - start < 3.0
    assert again.groups == busi.groups


def test_breakhis_manifest(data_root, breakhis_dir):
    catalog = read_dataset("breakhis", root=data_root)
    assert catalog.meta["format"] == "breakhis-manifest" and catalog.grouping == "slide"
    assert len(catalog) == 714 and _classes(catalog) == {"benign": 173, "malignant": 541}
    assert len(set(catalog.groups)) == 40
    assert {r.meta["magnification"] for r in catalog.records} == {200}
    strict = read_dataset(breakhis_dir / "manifest.csv", group_by="patient")
    assert strict.grouping == "patient"
    patients = set(strict.groups)
    assert "29960" in patients and "29960AB" not in patients
    assert len(patients) == 36  # 29960AB/CD, 23060AB/CD, 18842/18842D, 19979/19979C merge
    # Naming the folder or the manifest gives the same relative paths (and so the same split hash).
    assert [catalog.relpath(r) for r in catalog.records] == [strict.relpath(r) for r in strict.records]


def test_breakhis_magnification_filter(data_root, breakhis_dir):
    with pytest.raises(BreastvisionError, match="no usable images"):
        read_dataset("breakhis", root=data_root, magnification="40X")
    assert len(read_dataset("breakhis", root=data_root, magnification=[200, "400"])) == 714


SAMPLE_NAMES = {
    # name: (class, subtype, slide, patient, magnification, sequence)
    "SOB_B_A-14-22549AB-100-027.png": ("B", "A", "22549AB", "22549", 100, 27),
    "SOB_B_A-14-22549CD-400-006.png": ("B", "A", "22549CD", "22549", 400, 6),
    "SOB_B_F-14-14134E-400-001.png": ("B", "F", "14134E", "14134", 400, 1),
    "SOB_B_PT-14-22704-40-013.png": ("B", "PT", "22704", "22704", 40, 13),
    "SOB_B_PT-14-22704-400-028.png": ("B", "PT", "22704", "22704", 400, 28),
    "SOB_B_TA-14-16184-200-025.png": ("B", "TA", "16184", "16184", 200, 25),
    "SOB_B_TA-14-16184CD-400-024.png": ("B", "TA", "16184CD", "16184", 400, 24),
    "SOB_B_TA-14-16184CD-400-026.png": ("B", "TA", "16184CD", "16184", 400, 26),
    "SOB_M_DC-14-17614-400-014.png": ("M", "DC", "17614", "17614", 400, 14),
    "SOB_M_DC-14-20629-400-017.png": ("M", "DC", "20629", "20629", 400, 17),
    "SOB_M_DC-14-3909-100-014.png": ("M", "DC", "3909", "3909", 100, 14),
    "SOB_M_LC-14-13412-200-003.png": ("M", "LC", "13412", "13412", 200, 3),
    "SOB_M_MC-14-18842D-200-016.png": ("M", "MC", "18842D", "18842", 200, 16),
    "SOB_M_PC-14-15704-40-022.png": ("M", "PC", "15704", "15704", 40, 22),
    "SOB_M_PC-14-19440-400-034.png": ("M", "PC", "19440", "19440", 400, 34),
    "SOB_M_PC-14-9146-400-014.png": ("M", "PC", "9146", "9146", 400, 14),
}


def test_breakhis_sample_names(data_root, breakhis_samples_dir):
    catalog = read_dataset("breakhis_samples", root=data_root)
    assert catalog.meta["format"] == "breakhis-names" and catalog.skipped == []
    assert {r.path.name for r in catalog.records} == set(SAMPLE_NAMES)
    for record in catalog.records:
        tumour, subtype, slide, patient, magnification, sequence = SAMPLE_NAMES[record.path.name]
        meta = record.meta
        assert catalog.class_names[record.label] == {"B": "benign", "M": "malignant"}[tumour]
        assert (meta["biopsy"], meta["year"]) == ("SOB", 2014)
        assert (meta["subtype"], meta["slide"], meta["patient"]) == (subtype, slide, patient)
        assert (meta["magnification"], meta["sequence"]) == (magnification, sequence)
        assert (meta["width"], meta["height"]) == (700, 460) and record.group == slide
    assert len(set(catalog.groups)) == 14
    assert len(set(read_dataset(breakhis_samples_dir, group_by="patient").groups)) == 12
    only_400 = read_dataset(breakhis_samples_dir, magnification="400x")
    assert len(only_400) == 9 and sum(only_400.meta["filtered_out"].values()) == 7


def test_lc25000(data_root, lc25000_dir):
    catalog = read_dataset("lc25000", root=data_root)
    assert catalog.class_names == ["lung_aca", "lung_n", "lung_scc"]
    assert len(catalog) == 2959 and catalog.grouping == "tile_group" and catalog.skipped == []
    assert len(set(catalog.groups)) == 740
    assert max(Counter(catalog.groups).values()) <= 4
    assert all(r.group.startswith(catalog.class_names[r.label]) for r in catalog.records)
    via_manifest = read_dataset(lc25000_dir.parent / "manifest.csv")
    assert via_manifest.root == catalog.root


def test_missing_named_dataset_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'busi' not found at .*obtain it from"):
        read_dataset("busi", root=tmp_path)


# ------------------------------------------------------------- generated data


def _image(path: Path, seed: int = 0, size=(48, 40), mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return path


def _reasons(catalog) -> dict[str, str]:
    return {s.path.name: s.reason for s in catalog.skipped}


def test_parse_name_rejections():
    assert parse_name("SOB_M_DC-14-16716-400-012.png").subtype_name == "ductal_carcinoma"
    for bad, reason in [
        ("SOB_M_XX-14-16716-400-012.png", "unknown subtype 'XX'"),
        ("SOB_B_DC-14-16716-400-012.png", "subtype DC contradicts class B"),
        ("SOB_M_DC-14-16716-300-012.png", "magnification 300X"),
        ("patient-200-1.png", "not an official BreakHis file name"),
    ]:
        with pytest.raises(BreakHisNameError, match=reason):
            parse_name(bad)
    assert parse_magnification("40x") == 40
    with pytest.raises(BreastvisionError, match="magnification '50'"):
        parse_magnification("50")


def test_breakhis_official_tree(tmp_path):
    root = tmp_path / "BreaKHis_v1"
    base = root / "histology_slides/breast"
    _image(base / "benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-40-001.png", 1)
    _image(base / "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png", 2)
    _image(base / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/SOB_M_DC-14-2523-40-001.png", 3)
    _image(base / "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/renamed.png", 4)
    (base / "README.txt").write_text("notes")
    assert detect_format(root)[0] == "breakhis-names"
    catalog = read_dataset(root)
    assert len(catalog) == 3 and catalog.labels == [0, 0, 1]
    reasons = _reasons(catalog)
    assert "not an official BreakHis file name" in reasons["renamed.png"]
    assert "not an image file" in reasons["README.txt"]
    with pytest.raises(BreastvisionError, match="near_duplicates do not apply to breakhis-names"):
        read_dataset(root, near_duplicates=True)
    with pytest.raises(BreastvisionError, match="grouping 'case' unknown"):
        read_dataset(root, group_by="case")


def _busi_tree(root: Path) -> Path:
    for label, name in enumerate(["normal", "benign", "malignant"]):
        for i in range(3):
            stem = f"{name} ({i})"
            _image(root / name / f"{stem}.png", seed=10 * label + i, size=(64, 56))
            _image(root / name / f"{stem}_mask.png", seed=99, size=(64, 56))
    _image(root / "benign" / "benign (0)_mask_1.png", seed=98, size=(64, 56))
    _image(root / "benign" / "benign (1)_mask_2.png", seed=98, size=(64, 56))
    _image(root / "benign" / "benign (1)_mask_1.png", seed=98, size=(64, 56))
    return root


def test_busi_generated_bad_cases(tmp_path):
    root = _busi_tree(tmp_path / "Dataset_BUSI_with_GT")
    # A copy of a benign scan filed as malignant: a near-duplicate label conflict.
    (root / "malignant" / "malignant (9).png").write_bytes((root / "benign" / "benign (2).png").read_bytes())
    _image(root / "malignant" / "orphan_mask.png", seed=5, size=(64, 56))
    _image(root / "normal" / "normal (0)_mask_1.png", seed=5, size=(30 + 40, 56))  # wrong size
    (root / "benign" / "benign (7).png").touch()  # zero bytes
    _image(root / "unknown" / "x (1).png", seed=6)
    (root / "Thumbs.db").write_bytes(b"\0" * 10)
    cache = dedup.HashCache(tmp_path / "hashes.json")
    assert detect_format(tmp_path)[0] == "busi"  # the wrapper folder is looked through
    catalog = read_dataset(root, cache=cache)
    assert catalog.class_names == ["normal", "benign", "malignant"]
    assert Counter(catalog.labels) == {0: 3, 1: 3, 2: 4}
    by_name = {r.path.name: r for r in catalog.records}
    assert [m.name for m in by_name["benign (0).png"].masks] == [
        "benign (0)_mask.png",
        "benign (0)_mask_1.png",
    ]
    assert [m.name for m in by_name["benign (1).png"].masks] == [
        "benign (1)_mask.png",
        "benign (1)_mask_1.png",
        "benign (1)_mask_2.png",
    ]
    assert [m.name for m in by_name["normal (0).png"].masks] == ["normal (0)_mask.png"]
    assert by_name["malignant (9).png"].masks == ()
    reasons = _reasons(catalog)
    assert reasons["orphan_mask.png"].startswith("mask without its image")
    assert reasons["normal (0)_mask_1.png"] == "mask is 70×56 but its image is 64×56"
    assert reasons["benign (7).png"] == "empty file (0 bytes)"
    assert reasons["unknown"].startswith("unknown class folder 'unknown'")
    assert reasons["Thumbs.db"] == "not inside a class folder"
    assert len(catalog.skipped) == 5
    conflicts = catalog.meta["near_duplicates"]["label_conflicts"]
    assert [sorted(c["files"]) for c in conflicts] == [
        ["benign/benign (2).png", "malignant/malignant (9).png"]
    ]
    assert by_name["benign (2).png"].group == by_name["malignant (9).png"].group
    assert len(set(catalog.groups)) == len(catalog) - 1
    assert (tmp_path / "hashes.json").is_file()


def test_hash_cache_skips_unchanged_files(tmp_path, monkeypatch):
    paths = [_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    cache_file = tmp_path / "cache.json"
    first = dedup.hash_images(paths, dedup.HashCache(cache_file))

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(dedup, "hash_image", no_decoding)
    assert dedup.hash_images(paths, dedup.HashCache(cache_file)) == first
    _image(paths[0], seed=50)
    os.utime(paths[0], ns=(1, 1))  # a changed file (other size or time) is hashed again
    with pytest.raises(AssertionError, match="0.png decoded again"):
        dedup.hash_images(paths, dedup.HashCache(cache_file))


def test_near_duplicate_thresholds():
    same = dedup.ImageHashes("ffff0000ffff0000", "00ff00ff00ff00ff")
    near = dedup.ImageHashes("ffff0000ffff3fff", "00ff00ff00ff7fff")  # 14 and 7 bits away
    far = dedup.ImageHashes("0000ffffffff0000", "00ff00ff00ff00ff")  # pHash 32 bits away
    assert list(dedup.near_duplicate_components([same, near, far])) == [0, 0, 1]
    # At both limits is a duplicate; one bit past either is not.
    limit = dedup.ImageHashes("ffff0000ffff3fff", "00ff00ff00fffe00")  # 14 and 15 bits away
    past_d = dedup.ImageHashes("ffff0000ffff3fff", "00ff00ff00ffff00")  # 14 and 16
    past_p = dedup.ImageHashes("ffff0000ffffffff", "00ff00ff00ff00ff")  # 16 and 0
    assert len(set(dedup.near_duplicate_components([same, limit]))) == 1
    assert len(set(dedup.near_duplicate_components([same, past_d]))) == 2
    assert len(set(dedup.near_duplicate_components([same, past_p]))) == 2


def test_generic_class_tree(tmp_path):
    root = tmp_path / "hospital"
    _image(root / "benign" / "a.png", 1)
    _image(root / "benign" / "patient7" / "b.jpg", 2, mode="RGB")
    _image(root / "malignant" / "c.png", 3, mode="RGB")
    _image(root / "malignant" / "tiny.png", 4, size=(1, 1))
    (root / "malignant" / "report.png").write_text("not an image")
    (root / "empty_folder").mkdir()
    (root / "malignant" / "notes.txt").write_text("x")
    catalog = read_dataset(root)
    assert catalog.meta["format"] == "class-folders" and catalog.name == "hospital"
    assert catalog.class_names == ["benign", "malignant"] and catalog.labels == [0, 0, 1]
    assert catalog.grouping == "image" and any("own group" in n for n in catalog.meta["notes"])
    reasons = _reasons(catalog)
    assert "below the 32-pixel minimum side" in reasons["tiny.png"]
    assert reasons["report.png"].startswith("not an image (content is none of the accepted formats PNG")
    assert reasons["notes.txt"].startswith("not an image file")
    assert reasons["empty_folder"].startswith("folder holds no images")
    fixed = read_dataset(root, class_names=["malignant", "benign", "normal"])
    assert fixed.class_names == ["malignant", "benign", "normal"] and fixed.labels == [1, 1, 0]
    only = read_dataset(root, class_names=["benign"])
    assert _reasons(only)["malignant"].startswith("unknown class folder 'malignant' (expected benign)")


def test_generic_manifest(tmp_path):
    for i, name in enumerate(["x1.png", "x2.png", "y1.png", "y2.png", "y3.png", "extra.png"]):
        _image(tmp_path / "imgs" / name, seed=i)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    manifest = tmp_path / "imgs" / "labels.csv"
    manifest.write_text(
        "path,label,group,site\n"
        "x1.png,malignant,p1,A\nx2.png,malignant,p1,A\ny1.png,benign,p2,B\ngone.png,benign,p3,B\n"
        "broken.png,benign,p4,B\nx1.png,benign,p5,B\ny2.png,unknown,p5,B\ny3.png,benign,,B\n"
    )
    catalog = read_dataset(manifest)
    assert catalog.meta["format"] == "manifest" and catalog.grouping == "group"
    assert catalog.class_names == ["benign", "malignant", "unknown"] and len(catalog) == 4
    strict = read_dataset(manifest, class_names=["benign", "malignant"])
    assert [(strict.relpath(r), r.label, r.group, r.meta["site"]) for r in strict.records] == [
        ("x1.png", 1, "p1", "A"),
        ("x2.png", 1, "p1", "A"),
        ("y1.png", 0, "p2", "B"),
    ]
    reasons = sorted((s.path.name, s.reason) for s in strict.skipped)
    assert reasons == [
        ("broken.png", "unreadable image header (Truncated File Read)"),
        ("extra.png", "image on disk but not listed in the manifest"),
        ("gone.png", "listed in labels.csv but missing on disk"),
        ("x1.png", "listed again in labels.csv (row 7); the first listing is used"),
        ("y2.png", "unknown label 'unknown' (expected benign, malignant)"),
        ("y3.png", "empty 'group' in labels.csv"),
    ]
    with pytest.raises(BreastvisionError, match="already gives the groups"):
        read_dataset(manifest, near_duplicates=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,b\n")
    with pytest.raises(BreastvisionError, match="manifest lacks column"):
        read_dataset(bad)


def test_lc25000_without_manifest_is_flagged(tmp_path):
    for i, name in enumerate(["lung_aca", "lung_n", "lung_scc"]):
        _image(tmp_path / name / f"{name}{i}.jpeg", seed=i, mode="RGB")
    _image(tmp_path / "colon_aca" / "colonca1.jpeg", seed=7, mode="RGB")
    catalog = read_dataset(tmp_path)
    assert catalog.meta["format"] == "lc25000" and catalog.grouping == "image"
    assert "straddle a split (leaky)" in catalog.meta["notes"][0]
    assert _reasons(catalog)["colon_aca"].startswith("unknown class folder")


@pytest.mark.parametrize("layout", ["empty", "only_bad", "busi_empty"])
def test_empty_datasets_are_errors(tmp_path, layout):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "only_bad":
        (root / "a").mkdir()
        (root / "a" / "x.png").touch()
        (root / "b").mkdir()
        (root / "b" / "y.png").write_text("no")
        match = r"no usable images .* 2 files skipped"
    elif layout == "busi_empty":
        for name in ("normal", "benign", "malignant"):
            (root / name).mkdir()
        match = "no usable images found for dataset 'busi'"
    else:
        match = "no usable images"
    with pytest.raises(BreastvisionError, match=match):
        read_dataset(root)


def test_verify_finds_truncated_files(tmp_path):
    good = _image(tmp_path / "a" / "good.png", 1)
    cut = _image(tmp_path / "a" / "cut.png", 2, size=(200, 200))
    cut.write_bytes(cut.read_bytes()[:300])
    _image(tmp_path / "b" / "other.png", 3)
    assert len(read_dataset(tmp_path)) == 3  # headers alone look fine
    verified = read_dataset(tmp_path, verify=True)
    assert len(verified) == 2 and good in [r.path for r in verified.records]
    assert "corrupt or truncated" in _reasons(verified)["cut.png"]


def test_unknown_source(tmp_path):
    with pytest.raises(BreastvisionError, match="neither a known dataset"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(BreastvisionError, match="expected a dataset folder or a CSV manifest"):
        read_dataset(tmp_path / "x.txt")


def test_wrapper_folder_and_one_class_external_set(tmp_path):
    _image(tmp_path / "download" / "set" / "a" / "1.png", 1)
    _image(tmp_path / "download" / "set" / "b" / "2.png", 2)
    wrapped = read_dataset(tmp_path / "download")
    assert wrapped.root == tmp_path / "download" / "set" and wrapped.class_names == ["a", "b"]
    _image(tmp_path / "hospital" / "malignant" / "3.png", 3)
    external = read_dataset(tmp_path / "hospital")
    assert external.class_names == ["malignant"] and len(external) == 1
    assert external.meta["source"] == str(tmp_path / "hospital")
