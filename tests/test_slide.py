"""predict-slide: scale (BreakHis optics, tile geometry), tissue detection, tile predictions equal to
``predict`` on the same patches, the output files, and bad slides (truncated, damaged, no scale)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from breastvision.cli import main
from breastvision.data.readers.breakhis import input_mpp, microns_per_pixel
from breastvision.data.records import Record
from breastvision.data.stain import make_normalizer
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.slide.outputs import LEGEND_HEIGHT
from breastvision.slide.reader import SlideError
from breastvision.slide.scale import model_scale, tile_geometry
from breastvision.slide.tissue import tissue_mask
from slide_mosaic import mosaic, write_pyramid

CLASSES = ("benign", "malignant")
SLIDE_MPP = 0.5
#: Model input 128 px; one tile = 224 level-0 pixels = one BreakHis patch, read at level 0.
MODEL_SIDE, CELL = 128, 224
MODEL_MPP = CELL * SLIDE_MPP / MODEL_SIDE
#: Where the patches go in the 3×4 grid (row, column); every other cell is white glass.
PLACES = [(0, 0), (0, 2), (1, 1), (1, 3), (2, 0), (2, 1)]


@pytest.fixture(scope="module")
def patches(breakhis_dir: Path) -> list[Path]:
    """Six real BreakHis 200X fields, three per class, mostly tissue."""
    chosen: list[Path] = []
    for label in CLASSES:
        files = sorted((breakhis_dir / label).rglob("*.png"))
        picked = [f for f in files if tissue_mask(Image.open(f)).mean() > 0.8][:3]
        chosen += picked
    assert len(chosen) == 6
    return chosen


@pytest.fixture(scope="module")
def slide(patches: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    cells: list[list[Image.Image | None]] = [[None] * 4 for _ in range(3)]
    for (row, column), path in zip(PLACES, patches, strict=True):
        cells[row][column] = Image.open(path)
    out = tmp_path_factory.mktemp("slides") / "mosaic.tif"
    return write_pyramid(out, mosaic(cells, (CELL, CELL)), SLIDE_MPP)


@pytest.fixture(scope="module")
def model_file(make_model_file, patches: list[Path]) -> Path:
    stain = make_normalizer("macenko").fit(Image.open(patches[0]).convert("RGB")).state_dict()
    return make_model_file("resnet18", input_size=MODEL_SIDE, stain=stain, class_names=CLASSES,
                           mpp=(MODEL_MPP, MODEL_MPP))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _probs(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])


def test_breakhis_scale_follows_spanhol_optics_and_the_resized_field() -> None:
    # 6.5 × 6.25 µm camera pixels through a 20× objective and a 3.3× relay lens.
    assert microns_per_pixel("200X") == pytest.approx((6.5 / 66, 6.25 / 66))
    assert microns_per_pixel(40)[0] == pytest.approx(10 * microns_per_pixel(400)[0])
    records = [Record(Path(f"{i}.png"), 0, "p", {"magnification": 200}) for i in range(3)]
    # The 700×460 field squashed into 224×224: anisotropic pixels.
    x, y = input_mpp(records, 224)
    assert (x * 224, y * 224) == pytest.approx((700 * 6.5 / 66, 460 * 6.25 / 66))
    mixed = records + [Record(Path("m.png"), 0, "p", {"magnification": 40})]
    assert input_mpp(mixed, 224) is None


def test_training_records_the_scale(breakhis_dir: Path, image_tree) -> None:
    from breastvision.training.config import config_from_dict
    from breastvision.training.data_setup import prepare_data
    from breastvision.training.engine import _training_scale

    config = config_from_dict({"data": {"source": str(breakhis_dir)}})
    data = prepare_data(config)
    assert _training_scale(config, data, 224) == pytest.approx(input_mpp(data.catalog.records, 224))
    stated = config_from_dict({"data": {"source": str(breakhis_dir), "mpp": [0.5, 0.4]}})
    assert _training_scale(stated, data, 224) == (0.5, 0.4)
    split = {"protocol": "group_holdout", "options": {"fractions": [0.5, 0.25, 0.25]}}
    generic = config_from_dict({"data": {"source": str(image_tree()), "split": split}})
    assert _training_scale(generic, prepare_data(generic), 224) is None


def test_tile_geometry_reads_the_model_field_from_the_right_level() -> None:
    pre = Preprocessing(input_size=224, mpp=(700 * 6.5 / 66 / 224, 460 * 6.25 / 66 / 224))
    mpp = model_scale(pre, None)
    # A 0.25 µm/px scan: the 68.9 × 43.6 µm field is 276 × 174 level-0 pixels, read at level 0.
    g = tile_geometry(pre, mpp, (0.25, 0.25), (1.0, 4.0, 16.0), (10_000, 10_000))
    assert g.size0 == (276, 174) and g.level == 0 and g.read_size == (276, 174)
    # A 0.05 µm/px scan: 1379 × 871 pixels; level 1 (2×) is still finer than the model, level 2 is not.
    g = tile_geometry(pre, mpp, (0.05, 0.05), (1.0, 2.0, 4.0), (10_000, 10_000))
    assert g.level == 1 and g.read_size == (round(g.size0[0] / 2), round(g.size0[1] / 2))
    assert min(g.zoom) >= 1
    with pytest.raises(SlideError, match="does not fit"):
        tile_geometry(pre, mpp, (0.25, 0.25), (1.0,), (200, 200))
    with pytest.raises(BreastvisionError, match="--mpp-model"):
        model_scale(Preprocessing(), None)
    assert model_scale(Preprocessing(), (0.5, 0.5)) == (0.5, 0.5)


def test_model_scale_survives_the_model_file(make_model_file) -> None:
    path = make_model_file("resnet18", input_size=32, class_names=CLASSES, mpp=(0.3, 0.2))
    assert ModelBundle.load(path).preprocessing.mpp == (0.3, 0.2)
    assert ModelBundle.load(make_model_file("resnet18", input_size=32)).preprocessing.mpp is None
    # A file written before the field existed (no "mpp" key) still loads, as an unknown scale.
    meta = ModelBundle.load(path).metadata()
    del meta["preprocessing"]["mpp"]
    assert ModelBundle.from_metadata(meta, {}).preprocessing.mpp is None


def test_tiles_equal_patch_predictions_and_background_is_skipped(
    slide: Path, patches: list[Path], model_file: Path, tmp_path: Path, capsys
) -> None:
    assert main(["predict", str(model_file), *map(str, patches), "--out", str(tmp_path / "patches.csv")]) == 0
    expected = _probs(_rows(tmp_path / "patches.csv"))
    # The check can fail: the random model tells these patches apart.
    assert np.abs(expected[:, None] - expected[None]).max() > 1e-3

    out = tmp_path / "out"
    assert main(["predict-slide", str(model_file), str(slide), "--out", str(out), "--batch-size", "4"]) == 0
    assert "6 tissue tiles predicted, 6 background skipped" in capsys.readouterr().out
    rows = _rows(out / "mosaic_tiles.csv")
    assert [(int(r["row"]), int(r["column"])) for r in rows] == PLACES
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [(c * CELL, r * CELL) for r, c in PLACES]
    np.testing.assert_allclose(_probs(rows), expected, atol=1e-5)


def test_outputs_parse_and_agree(slide: Path, model_file: Path, tmp_path: Path) -> None:
    flags = ["--out", str(tmp_path), "--threshold", "0.4"]
    assert main(["predict-slide", str(model_file), str(slide), *flags]) == 0
    rows = _rows(tmp_path / "mosaic_tiles.csv")
    p = _probs(rows)[:, 1]

    doc = json.loads((tmp_path / "mosaic_tiles.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(rows)
    for feature, row in zip(doc["features"], rows, strict=True):
        ring = feature["geometry"]["coordinates"][0]
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        x, y = int(row["x"]), int(row["y"])
        assert ring == [[x, y], [x + CELL, y], [x + CELL, y + CELL], [x, y + CELL], [x, y]]
        props = feature["properties"]
        assert props["objectType"] == "tile" and props["classification"]["name"] == row["predicted"]
        assert len(props["classification"]["color"]) == 3
        assert props["measurements"]["p_malignant"] == pytest.approx(float(row["p_malignant"]), abs=1e-6)

    summary = json.loads((tmp_path / "mosaic_summary.json").read_text())
    assert summary["score"] == pytest.approx(p.mean(), abs=1e-5)
    assert summary["fraction_above_threshold"] == pytest.approx((p >= 0.4).mean())
    assert summary["tiles"] == {"grid": 12, "tissue": 6, "background_skipped": 6}
    assert summary["slide"]["mpp"] == [SLIDE_MPP, SLIDE_MPP]
    assert summary["slide"]["mpp_source"] == "slide metadata"
    assert summary["tiling"]["level"] == 0 and summary["tiling"]["tile_level0_px"] == [CELL, CELL]

    heat = np.asarray(Image.open(summary["files"]["heatmap"]).convert("RGB")).astype(int)[:-LEGEND_HEIGHT]
    assert heat.shape[1] / heat.shape[0] == pytest.approx(4 / 3, rel=0.02)
    # Glass cells stay white; tissue cells are tinted.
    h, w = heat.shape[0] // 3, heat.shape[1] // 4
    assert heat[h // 2, w + w // 2].min() == 255
    assert heat[h // 2, w // 2].mean() < 250


def test_bad_slides_are_clear_errors_or_listed_skips(
    slide: Path, model_file: Path, tmp_path: Path, capsys
) -> None:
    data = slide.read_bytes()
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(data[: len(data) // 2])
    assert main(["predict-slide", str(model_file), str(truncated), "--out", str(tmp_path)]) == 2
    assert "truncated or damaged" in capsys.readouterr().err
    Image.new("RGB", (64, 64), "pink").save(tmp_path / "patch.png")
    assert main(["predict-slide", str(model_file), str(tmp_path / "patch.png"), "--out", str(tmp_path)]) == 2
    message = "an ordinary image (64×64), not a whole-slide image: use 'breastvision predict'"
    assert message in capsys.readouterr().err

    # Damaged tile data: opens, then fails on a read; the good slide beside it is still predicted.
    import tifffile

    with tifffile.TiffFile(slide) as tif:
        offset = tif.pages[0].dataoffsets[0]
    damaged = bytearray(data)
    damaged[offset:offset + 64] = bytes(64)
    (tmp_path / "damaged.tif").write_bytes(bytes(damaged))
    code = main(["predict-slide", str(model_file), str(tmp_path / "damaged.tif"), str(slide),
                 "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 0 and "damaged.tif: reading the slide failed" in captured.err
    assert (tmp_path / "out" / "mosaic_tiles.csv").is_file()
    assert not (tmp_path / "out" / "damaged_tiles.csv").exists()


def test_unknown_scales_need_mpp_flags(slide: Path, model_file: Path, make_model_file, tmp_path: Path,
                                       capsys) -> None:
    import tifffile

    plain = write_pyramid(tmp_path / "plain.tif", tifffile.imread(slide, key=0), None, levels=1)
    assert main(["predict-slide", str(model_file), str(plain), "--out", str(tmp_path)]) == 2
    assert "pass --mpp" in capsys.readouterr().err
    flags = ["--out", str(tmp_path), "--mpp", str(SLIDE_MPP)]
    assert main(["predict-slide", str(model_file), str(plain), *flags]) == 0
    assert json.loads((tmp_path / "plain_summary.json").read_text())["slide"]["mpp_source"] == "--mpp"
    # Stated coarser than the model's scale: predicted, with the enlargement said.
    flags = ["--out", str(tmp_path / "coarse"), "--mpp", "2"]
    assert main(["predict-slide", str(model_file), str(plain), *flags]) == 0
    assert "coarser than the model's training scale: tiles were enlarged 2.29×" in capsys.readouterr().err

    old = make_model_file("resnet18", input_size=MODEL_SIDE, class_names=CLASSES)
    assert main(["predict-slide", str(old), str(slide), "--out", str(tmp_path)]) == 2
    assert "--mpp-model" in capsys.readouterr().err


def test_every_bad_input_case_is_a_listed_skip(slide: Path, model_file: Path, tmp_path: Path, capsys) -> None:
    """The standing bad-input corpus: none of its files is a slide (the usable ones are plain images,
    which ``predict`` takes), so each is one listed skip, and the good slide beside them is predicted."""
    from badinput import write_image_corpus

    made = write_image_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    slides = [*map(str, made.values()), str(slide)]
    assert main(["predict-slide", str(model_file), *slides, "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert len(skipped) == len(made), "\n".join(lines)
    assert (out / "mosaic_tiles.csv").is_file()
