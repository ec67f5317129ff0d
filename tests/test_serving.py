"""predict (PyTorch and ONNX) and export: discovery, pre-processing from the model file, TTA,
skipped files, output tables, ONNX metadata and PyTorch parity, CLI errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import breastvision
from breastvision.cli import main
from breastvision.data.io import load_image
from breastvision.data.stain import make_normalizer
from breastvision.data.transforms import preprocess_image
from breastvision.models.bundle import ModelBundle
from breastvision.serving.export import export_onnx
from breastvision.serving.predict import discover_images, load_predictor

CLASSES = ["benign", "malignant", "normal"]


def _noise(size: tuple[int, int], seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good images (one grey JPEG in a sub-folder), a mask, and three bad files."""
    root = tmp_path_factory.mktemp("data") / "scans"
    (root / "sub").mkdir(parents=True)
    _noise((90, 90), 1).save(root / "a.png")
    _noise((100, 80), 2, "L").save(root / "sub" / "b.jpg")
    _noise((100, 80), 3, "L").save(root / "sub" / "b_mask.png")
    (root / "notes.txt").write_text("not an input")
    buffer = io.BytesIO()
    _noise((90, 90), 4).save(buffer, format="PNG")
    (root / "broken.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "fake.png").write_text("this is text, not a PNG")
    _noise((10, 10), 5).save(root / "tiny.png")
    return root


def _reference(model_file: Path, paths: list[Path], stain: bool = True) -> np.ndarray:
    """Probabilities computed by hand from the model file, the way predict must compute them."""
    bundle = ModelBundle.load(model_file)
    pre = bundle.preprocessing if stain else type(bundle.preprocessing)(
        **{**bundle.preprocessing.__dict__, "stain": None}
    )
    batch = torch.stack([preprocess_image(load_image(p), pre) for p in paths])
    with torch.inference_mode():
        return torch.softmax(bundle.build_model()(batch), 1).numpy()


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _opsets(onnx_file: Path) -> list[int]:
    return [o.version for o in onnx.load(str(onnx_file)).opset_import if o.domain in ("", "ai.onnx")]


def _probs(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])


def test_discovery_finds_images_skips_masks_and_reports_missing(scans: Path, tmp_path: Path) -> None:
    assert discover_images([scans]).masks == 1
    # A mask named explicitly is reported; files met twice are predicted once, under their first name.
    found = discover_images([scans / "sub" / "b_mask.png", scans, scans / "a.png", tmp_path / "nowhere"])
    names = [name for _, name in found.images]
    assert names == ["scans/a.png", "scans/broken.png", "scans/fake.png", "scans/sub/b.jpg", "scans/tiny.png"]
    assert found.masks == 0
    reasons = {s.path.name: s.reason for s in found.skipped}
    assert reasons == {
        "b_mask.png": "a lesion mask (*_mask*), not a sample",
        "nowhere": "no such file or folder",
    }


def test_discovery_names_linked_files_where_found_and_lists_empty_folders(scans: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "elsewhere.png").symlink_to(scans / "a.png")  # a link out of the folder given
    (tmp_path / "links" / "notes").write_text("not an input: passed over")
    found = discover_images([tmp_path / "links", tmp_path / "empty"])
    assert [name for _, name in found.images] == ["links/elsewhere.png"]
    assert [(s.path.name, s.reason) for s in found.skipped] == [("empty", "folder holds no image files")]


def test_predict_applies_the_model_files_preprocessing(make_model_file, scans: Path, tmp_path: Path) -> None:
    stain = make_normalizer("reinhard").fit(_noise((64, 64), 9)).state_dict()
    model_file = make_model_file("resnet18", input_size=64, resize=72, stain=stain)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(model_file), str(scans), "--out", str(out)]) == 0
    rows = _read_csv(out)
    good = [r for r in rows if not r["skipped"]]
    assert [r["path"] for r in good] == ["scans/a.png", "scans/sub/b.jpg"]
    probs = _probs(good)
    expected = _reference(model_file, [scans / "a.png", scans / "sub" / "b.jpg"])
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    assert [r["predicted"] for r in good] == [CLASSES[i] for i in expected.argmax(1)]
    # The stain normaliser stored in the model file made a difference, so it really was applied.
    without_stain = _reference(model_file, [scans / "a.png", scans / "sub" / "b.jpg"], stain=False)
    assert np.abs(without_stain - expected).max() > 1e-4
    skipped = {Path(r["path"]).name: r["skipped"] for r in rows if r["skipped"]}
    assert set(skipped) == {"broken.png", "fake.png", "tiny.png"}
    assert "truncated" in skipped["broken.png"]
    assert "not an image" in skipped["fake.png"]
    assert "minimum side" in skipped["tiny.png"]


def test_predict_json_and_printed_table(make_model_file, scans: Path, tmp_path: Path, capsys) -> None:
    model_file = make_model_file("resnet18")
    out = tmp_path / "preds.json"
    argv = ["predict", str(model_file), str(scans / "a.png"), str(scans / "sub"), "--out", str(out)]
    assert main(argv) == 0
    document = json.loads(out.read_text())
    assert document["class_names"] == CLASSES and document["masks_ignored"] == 1
    assert [p["path"] for p in document["predictions"]] == [str(scans / "a.png"), "sub/b.jpg"]
    for p in document["predictions"]:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["predicted"] == max(p["probabilities"], key=p["probabilities"].get)
    capsys.readouterr()
    assert main(["predict", str(model_file), str(scans)]) == 0
    captured = capsys.readouterr()
    assert "a.png" in captured.out and "p(malignant)" in captured.out
    assert "skipped" in captured.err and "fake.png" in captured.err
    assert "ignored 1 lesion mask" in captured.err


def test_patient_context_blends_each_image_with_its_folders_mean(make_model_file, tmp_path: Path) -> None:
    """One folder per patient: with weight 1 each image gets its folder's mean probabilities."""
    model_file = make_model_file("resnet18")
    for patient, seeds in {"p1": (11, 12, 13), "p2": (14,)}.items():
        (tmp_path / patient).mkdir()
        for seed in seeds:
            _noise((64, 64), seed).save(tmp_path / patient / f"f{seed}.png")
    alone, together = tmp_path / "alone.json", tmp_path / "together.json"
    argv = ["predict", str(model_file), str(tmp_path / "p1"), str(tmp_path / "p2"), "--out"]
    assert main([*argv, str(alone)]) == 0
    assert main([*argv, str(together), "--patient-context", "1"]) == 0
    a, t = (json.loads(f.read_text()) for f in (alone, together))
    assert t["patient_context"] == 1 and a["patient_context"] == 0
    probs = {p["path"]: [p["probabilities"][c] for c in CLASSES] for p in a["predictions"]}
    mean = np.mean([v for k, v in probs.items() if not k.startswith("p2/")], axis=0).tolist()
    for p in t["predictions"]:
        expected = probs[p["path"]] if p["path"] == "p2/f14.png" else mean
        assert [p["probabilities"][c] for c in CLASSES] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        breastvision.load_model(model_file).predict_folder(tmp_path / "p1", patient_context=-0.5)


def test_tta_makes_predictions_invariant_to_rotation(make_model_file, tmp_path: Path) -> None:
    model_file = make_model_file("resnet18")
    image = _noise((64, 64), 11)  # the input size: no resampling to break the symmetry
    image.save(tmp_path / "up.png")
    image.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png")
    predictor = load_predictor(model_file)
    batch = torch.stack([predictor.preprocess(load_image(tmp_path / n)) for n in ("up.png", "turned.png")])
    plain, tta = predictor.probabilities(batch), predictor.probabilities(batch, tta=True)
    assert np.abs(plain[0] - plain[1]).max() > 1e-3  # the model alone is not rotation invariant
    np.testing.assert_allclose(tta[0], tta[1], atol=1e-5)
    out = tmp_path / "tta.csv"
    assert main(["predict", str(model_file), str(tmp_path / "up.png"), "--tta", "--out", str(out)]) == 0
    np.testing.assert_allclose(_probs(_read_csv(out)), tta[:1], atol=2e-6)


def test_explain_writes_overlays_of_the_original_size(make_model_file, scans: Path, tmp_path: Path) -> None:
    model_file = make_model_file("resnet18")
    out_dir = tmp_path / "cams"
    out = tmp_path / "preds.json"
    argv = ["predict", str(model_file), str(scans / "sub"), "--explain", str(out_dir), "--out", str(out)]
    assert main(argv) == 0
    png = out_dir / "sub__b_gradcam.png"
    assert sorted(out_dir.iterdir()) == [png]
    assert Image.open(png).size == (100, 80)
    assert json.loads(out.read_text())["predictions"][0]["overlays"] == {"gradcam": str(png)}

    single = (scans / "sub" / "b.jpg").resolve()
    assert main(["predict", str(model_file), str(single), "--explain", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["b_gradcam.png"]


@pytest.fixture(scope="module")
def fusion_export(make_model_file, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small fusion model (ResNet-18 ∥ timm's 6-block test ViT) and its default (opset 18) export."""
    model_file = make_model_file("fusion", input_size=160, resize=176, vit="test_vit")
    result = export_onnx(model_file, tmp_path_factory.mktemp("onnx") / "fusion.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4  # export's own check
    return model_file, result.path


def test_onnx_export_keeps_metadata_and_a_dynamic_batch(fusion_export: tuple[Path, Path]) -> None:
    model_file, onnx_file = fusion_export
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto)
    assert _opsets(onnx_file) == [18]
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["breastvision"] == json.loads(json.dumps(ModelBundle.load(model_file).metadata()))
    assert props["breastvision_onnx"]["output"] == "probabilities"
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 160, 160, generator=torch.Generator().manual_seed(3))
    expected = load_predictor(model_file).probabilities(x)
    for batch in (1, 3):  # the batch axis is dynamic; batch 1 is the latency case
        out = session.run(None, {"image": x[:batch].numpy()})[0]
        assert out.shape == (batch, 3)
        assert np.abs(out - expected[:batch]).max() <= 1e-4


def test_predict_with_onnx_matches_pytorch(fusion_export, scans: Path, tmp_path: Path) -> None:
    csv_torch, csv_onnx = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    for model, out in zip(fusion_export, (csv_torch, csv_onnx), strict=True):
        assert main(["predict", str(model), str(scans), "--tta", "--out", str(out)]) == 0
    rows_torch, rows_onnx = _read_csv(csv_torch), _read_csv(csv_onnx)
    assert [(r["path"], r["skipped"]) for r in rows_torch] == [(r["path"], r["skipped"]) for r in rows_onnx]
    good = [i for i, r in enumerate(rows_torch) if not r["skipped"]]
    assert len(good) == 2
    diff = np.abs(_probs([rows_torch[i] for i in good]) - _probs([rows_onnx[i] for i in good])).max()
    assert diff <= 1e-4


def test_densenet_se_exports_at_opset_17_and_matches_pytorch(make_model_file, tmp_path: Path) -> None:
    model_file = make_model_file("densenet121_se")
    result = export_onnx(model_file, tmp_path / "old.onnx", opset=17)
    assert _opsets(result.path) == [17]
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    diff = np.abs(load_predictor(model_file).probabilities(x) - load_predictor(result.path).probabilities(x))
    assert diff.max() <= 1e-4


def test_export_refusals(make_model_file, tmp_path: Path, capsys) -> None:
    model_file = make_model_file("resnet18")
    capsys.readouterr()
    assert main(["export", str(model_file), "--onnx", str(tmp_path / "x.onnx"), "--opset", "16"]) == 2
    assert main(["export", str(model_file), "--onnx", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert "--opset must be 17 or newer" in err and "must end in .onnx" in err


def test_cli_errors_are_one_line(make_model_file, fusion_export, scans: Path, tmp_path: Path, capsys) -> None:
    model_file, onnx_file = make_model_file("resnet18"), fusion_export[1]
    not_a_model = tmp_path / "weights.safetensors"
    not_a_model.write_bytes(b"\x00" * 64)
    no_metadata = tmp_path / "plain.onnx"
    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    onnx.save(proto, str(no_metadata))
    cases = [
        (["predict", str(tmp_path / "missing.safetensors"), str(scans)], "model file not found"),
        (["predict", str(not_a_model), str(scans)], "not a breastvision model file"),
        (["predict", str(no_metadata), str(scans)], "has no breastvision metadata"),
        (["predict", str(onnx_file), str(scans), "--explain", str(tmp_path / "c")], "needs the .safetensors"),
        (["predict", str(model_file), str(scans / "fake.png")], "no image could be predicted"),
        (["predict", str(model_file), str(scans), "--out", str(tmp_path / "p.txt")], "must end in .csv"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_export_prints_one_line_and_no_exporter_chatter(
    make_model_file, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from breastvision.serving.export import EXPORTER_LOGGERS

    caplog.set_level(logging.INFO)  # what the CLI shows
    assert main(["export", str(make_model_file()), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("wrote ") and out.count("\n") == 1 and err == ""
    assert not [r.getMessage() for r in caplog.records if r.name.startswith(EXPORTER_LOGGERS)]


def test_predict_table_never_cuts_file_names(make_model_file, tmp_path: Path, monkeypatch, capsys) -> None:
    """On a narrow terminal, long names that differ only at the end stay tellable apart."""
    folder = tmp_path / "a_rather_long_folder_name_for_a_hospital_export"
    folder.mkdir()
    names = [f"patient_0001_left_breast_transverse_view_{i}.png" for i in range(2)]
    for name in names:
        Image.new("RGB", (40, 40), (90, 60, 30)).save(folder / name)
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["predict", str(make_model_file()), str(folder)]) == 0
    shown = "".join(line.split("│")[1].strip() for line in capsys.readouterr().out.splitlines()
                    if line.count("│") > 2)
    assert all(name in shown for name in names)


def _calibrated_copy(model_file: Path, out: Path, temperature: float, thresholds: dict[str, float]) -> Path:
    """``model_file`` with a stored temperature and malignant-vs-rest thresholds, as training writes."""
    bundle = ModelBundle.load(model_file)
    bundle.calibration = {"method": "temperature scaling", "temperature": temperature,
                          "fitted_on": "validation"}
    bundle.operating_points = {"positive_class": "malignant", "target_sensitivity": 0.95,
                               "thresholds": thresholds}
    return bundle.save(out)


def test_calibrated_file_predicts_softmax_of_logits_over_t(make_model_file, tmp_path: Path) -> None:
    plain = make_model_file("resnet18")
    calibrated = _calibrated_copy(plain, tmp_path / "calibrated.safetensors", 2.5, {"youden": 0.3})
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        logits = ModelBundle.load(plain).build_model()(x)
    as_before = load_predictor(plain)
    assert ModelBundle.load(plain).temperature == 1.0 and ModelBundle.load(plain).thresholds == {}
    np.testing.assert_allclose(as_before.probabilities(x), torch.softmax(logits, 1).numpy(), atol=1e-6)
    scaled = load_predictor(calibrated).probabilities(x)
    np.testing.assert_allclose(scaled, torch.softmax(logits / 2.5, 1).numpy(), atol=1e-6)
    assert np.abs(scaled - as_before.probabilities(x)).max() > 1e-3  # the temperature made a difference
    assert (scaled.argmax(1) == as_before.probabilities(x).argmax(1)).all()
    # TTA averages the calibrated views.
    np.testing.assert_allclose(load_predictor(calibrated).probabilities(x, tta=True).sum(1), 1, atol=1e-5)


def test_predict_writes_a_decision_per_operating_point(make_model_file, scans: Path, tmp_path: Path) -> None:
    thresholds = {"sensitivity>=0.95": 0.2, "youden": 0.34}
    calibrated = _calibrated_copy(make_model_file("resnet18"), tmp_path / "c.safetensors", 0.5, thresholds)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(calibrated), str(scans), "--out", str(out)]) == 0
    rows = _read_csv(out)
    columns = ["malignant_at_sensitivity>=0.95", "malignant_at_youden"]
    assert list(rows[0]) == ["path", "predicted", "decision", *(f"p_{c}" for c in CLASSES), *columns,
                             "out_of_scope", "scope_score", "skipped"]
    good = [r for r in rows if not r["skipped"]]
    for column, threshold in zip(columns, thresholds.values(), strict=True):
        assert [r[column] for r in good] == [str(float(r["p_malignant"]) >= threshold) for r in good]
        assert all(r[column] == "" for r in rows if r["skipped"])
    document_file = tmp_path / "preds.json"
    assert main(["predict", str(calibrated), str(scans / "a.png"), "--out", str(document_file)]) == 0
    document = json.loads(document_file.read_text())
    assert document["operating_points"]["thresholds"] == thresholds
    assert set(document["predictions"][0]["decisions"]) == set(thresholds)
    # A file without operating points keeps the CSV as it was.
    assert main(["predict", str(make_model_file("resnet18")), str(scans), "--out", str(out)]) == 0
    assert list(_read_csv(out)[0]) == ["path", "predicted", "decision", *(f"p_{c}" for c in CLASSES),
                                       "out_of_scope", "scope_score", "skipped"]


def test_operating_point_chooses_the_decision(make_model_file, scans: Path, tmp_path: Path, capsys) -> None:
    # Threshold 0 calls every image malignant; threshold 1 none (the most probable other class instead).
    thresholds = {"sensitivity>=0.95": 0.0, "youden": 1.0}
    calibrated = _calibrated_copy(make_model_file("resnet18"), tmp_path / "c.safetensors", 1.0, thresholds)
    out = tmp_path / "preds.csv"
    decisions = {}
    for point in (None, *thresholds):
        assert main(["predict", str(calibrated), str(scans), "--out", str(out),
                     *(["--operating-point", point] if point else [])]) == 0
        good = [r for r in _read_csv(out) if not r["skipped"]]
        decisions[point] = [r["decision"] for r in good]
        predicted = [r["predicted"] for r in good]
    assert decisions[None] == predicted  # the default: the most probable class
    assert decisions["sensitivity>=0.95"] == ["malignant"] * len(good)
    others = [max(("benign", "normal"), key=lambda c, r=r: float(r[f"p_{c}"])) for r in good]
    assert decisions["youden"] == others
    document_file = tmp_path / "preds.json"
    assert main(["predict", str(calibrated), str(scans / "a.png"), "--out", str(document_file),
                 "--operating-point", "youden"]) == 0
    document = json.loads(document_file.read_text())
    assert document["decision_rule"] == "youden" and document["predictions"][0]["decision"] != "malignant"
    model = breastvision.load_model(calibrated, operating_point="sensitivity>=0.95")
    assert model.predict(scans / "a.png").decision == "malignant"
    capsys.readouterr()
    assert main(["predict", str(calibrated), str(scans), "--operating-point", "f1"]) == 2
    assert main(["predict", str(make_model_file("resnet18")), str(scans), "--operating-point", "youden"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "breastvision: error: --operating-point 'f1' is unknown; the stored ones: sensitivity>=0.95, youden",
        "breastvision: error: --operating-point 'youden' is unknown; the model file stores none"]


def test_onnx_export_applies_the_stored_temperature(make_model_file, tmp_path: Path) -> None:
    plain = make_model_file("resnet18")
    calibrated = _calibrated_copy(plain, tmp_path / "c.safetensors", 3.0, {"youden": 0.5})
    exported = export_onnx(calibrated, tmp_path / "c.onnx").path
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    onnx_probs = load_predictor(exported).probabilities(x)
    np.testing.assert_allclose(onnx_probs, load_predictor(calibrated).probabilities(x), atol=1e-4)
    # The graph itself stays uncalibrated: its output is the plain softmax.
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    raw = session.run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(raw, load_predictor(plain).probabilities(x), atol=1e-4)
