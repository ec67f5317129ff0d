"""``breastvision evaluate`` end to end: a tiny saved model on generated and real images."""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from breastvision.data.readers import read_dataset
from breastvision.data.splits import make_split
from breastvision.errors import BreastvisionError
from breastvision.evaluation import cli, evaluate
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model


def _evaluate(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["evaluate", *map(str, argv)])
    return args.func(args)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A random-init ResNet-18 at 64 px whose classes are listed in the reverse of the data's order,
    so that by-name class matching is exercised on every run."""
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2)
    bundle = ModelBundle(
        architecture="resnet18",
        class_names=["malignant", "benign"],
        state_dict=model.state_dict(),
        model_kwargs=model.model_kwargs,
        preprocessing=Preprocessing(input_size=64),
        lineage=[{"stage": "test", "weights": "random init"}],
    )
    return bundle.save(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Twelve generated images of four patients, listed in a manifest with a ``patient`` column."""
    folder = tmp_path_factory.mktemp("external")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        label = "malignant" if i % 4 < 2 else "benign"
        name = f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"path": name, "label": label, "patient": f"P{i % 4}"})
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _check_report(out: Path) -> dict:
    text = (out / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (out / link).is_file(), link
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_external_manifest(tmp_path: Path, model_file: Path, manifest: Path, capsys):
    out = tmp_path / "report"
    assert _evaluate(model_file, manifest, "--out", out, "--n-resamples", 50, "--tta") == 0
    metrics = _check_report(out)
    assert metrics["n_images"] == 12 and metrics["class_names"] == ["malignant", "benign"]
    assert metrics["patient"]["n_patients"] == 4
    assert metrics["bootstrap"]["resampled"] == "patients"
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 12
    # Labels were matched by name although the model lists its classes in the other order.
    expected = {f"img{i:02d}.png": "malignant" if i % 4 < 2 else "benign" for i in range(12)}
    assert {r["path"]: r["true_label"] for r in rows} == expected
    assert all(abs(float(r["p_malignant"]) + float(r["p_benign"]) - 1) < 1e-5 for r in rows)
    config = yaml.safe_load((out / "config.yaml").read_text())
    # The model's own view set: its lineage names no modality, so the 8 dihedral views.
    assert config["tta"] == "dihedral8" and len(config["model_sha256"]) == 64
    assert "random init" in (out / "report.md").read_text()  # the model file's lineage
    assert "P_arp" in capsys.readouterr().out


def test_patient_context_gives_each_image_its_patients_mean(tmp_path: Path, model_file: Path, manifest: Path):
    assert _evaluate(model_file, manifest, "--out", tmp_path / "alone", "--n-resamples", 0) == 0
    assert _evaluate(model_file, manifest, "--out", tmp_path / "ctx", "--n-resamples", 0,
                     "--patient-context", 1) == 0
    tables = [csv.DictReader((tmp_path / f / "predictions.csv").open()) for f in ("alone", "ctx")]
    alone, ctx = ({r["path"]: float(r["p_malignant"]) for r in rows} for rows in tables)
    for patient in range(4):
        names = [f"img{i:02d}.png" for i in range(patient, 12, 4)]
        assert [ctx[n] for n in names] == pytest.approx([np.mean([alone[n] for n in names])] * 3, abs=1e-6)
    assert yaml.safe_load((tmp_path / "ctx" / "config.yaml").read_text())["patient_context"] == 1
    with pytest.raises(BreastvisionError, match="not patients"):
        _evaluate(model_file, manifest, "--patient-level", "off", "--patient-context", 0.5,
                  "--out", tmp_path / "x")
    with pytest.raises(BreastvisionError, match=r"\[0, 1\]"):
        _evaluate(model_file, manifest, "--patient-context", 2, "--out", tmp_path / "y")


def test_evaluate_split_subset(tmp_path: Path, model_file: Path, manifest: Path):
    catalog = read_dataset(manifest)
    split = make_split(catalog, "group_kfold", seed=0, k=2)
    split_file = split.save(tmp_path / "split.json")
    out = tmp_path / "fold1"
    _evaluate(model_file, manifest, "--split", split_file, "--fold", 1, "--out", out, "--n-resamples", 0)
    metrics = _check_report(out)
    assert metrics["n_images"] == len(split.subset(catalog, "test", 1))
    assert (out / "split.json").read_bytes() == split_file.read_bytes()


def test_unknown_class_is_refused(tmp_path: Path, model_file: Path):
    for name in ("benign", "normal"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 40), "gray").save(tmp_path / name / "a.png")
    with pytest.raises(BreastvisionError, match=r"classes the model does not know: \['normal'\]"):
        _evaluate(model_file, tmp_path, "--out", tmp_path / "out")


def test_class_mapping():
    mapping = evaluate.class_mapping(["Benign", "malignant", "normal"], ["malignant", "benign"], {0, 1})
    assert mapping.tolist() == [1, 0, -1]  # "normal" has no images here, so it does not matter


def test_patient_level_choice():
    assert evaluate._use_patients("auto", "slide") and evaluate._use_patients("auto", "patient_id")
    assert not evaluate._use_patients("auto", "near_duplicate") and evaluate._use_patients("on", "group")
    assert not evaluate._use_patients("off", "slide")


def test_command_line_parser_does_not_import_torch():
    """``breastvision --help`` must stay fast: no command module may import torch when registering."""
    code = "import sys, breastvision.cli as c; c.build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_evaluate_real_breakhis_samples(tmp_path: Path, model_file: Path, breakhis_samples_dir: Path):
    out = tmp_path / "samples"
    _evaluate(model_file, breakhis_samples_dir, "--out", out, "--n-resamples", 100, "--batch-size", 8)
    metrics = _check_report(out)
    assert metrics["n_images"] == 16
    # BreakHis groups are slides, i.e. patients: patient-level metrics and patient resampling apply.
    assert metrics["patient"]["n_patients"] == len({r["group"] for r in csv.DictReader(
        (out / "predictions.csv").open())}) > 1
    assert metrics["intervals"]["patient.P_arp"]["resampled"] == "patients"
    assert (out / "plots" / "patient_accuracy.png").is_file()


def test_evaluate_views_of_an_after_augmentation_split(tmp_path: Path, model_file: Path, manifest: Path):
    # Paper 000 read literally: the test part holds (image, rotation/flip) pairs.
    catalog = read_dataset(manifest)
    split = make_split(catalog, "h_random_712_after_aug", seed=0)
    out = tmp_path / "views"
    _evaluate(model_file, manifest, "--split", split.save(tmp_path / "s.json"), "--out", out,
              "--n-resamples", 0)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    expected = {f"{catalog.relpath(i.record)}::{i.view}" for i in split.subset(catalog, "test")}
    assert {r["path"] for r in rows} == expected and len(rows) == len(expected)
    assert "leaky" in (out / "report.md").read_text()


def test_evaluate_resamples_near_duplicate_groups(tmp_path: Path, model_file: Path, image_tree):
    # BUSI's case: copies of one scan form a near-duplicate group, which the bootstrap draws whole.
    tree = tmp_path / "tree"
    for source in image_tree(per_class=4).rglob("*.png"):
        (tree / source.parent.name).mkdir(parents=True, exist_ok=True)
        for copy in ("a", "b"):
            (tree / source.parent.name / f"{source.stem}_{copy}.png").write_bytes(source.read_bytes())
    catalog = read_dataset(tree, near_duplicates=True)
    assert catalog.grouping == "near_duplicate" and len(set(catalog.groups)) == 8
    split_file = make_split(catalog, "group_kfold", seed=0, k=2).save(tmp_path / "split.json")
    out = tmp_path / "out"
    _evaluate(model_file, tree, "--split", split_file, "--fold", 0, "--out", out, "--n-resamples", 50)
    metrics = _check_report(out)
    assert metrics["bootstrap"]["resampled"] == "near-duplicate groups"
    assert metrics["bootstrap"]["n_groups"] == metrics["n_images"] // 2
    assert "patient" not in metrics


def test_evaluate_applies_the_stored_temperature_and_operating_points(
    tmp_path: Path, model_file: Path, manifest: Path
):
    calibrated = ModelBundle.load(model_file)
    calibrated.calibration = {"method": "temperature scaling", "temperature": 4.0, "fitted_on": "validation"}
    calibrated.operating_points = {"positive_class": "malignant", "target_sensitivity": 0.95,
                                   "thresholds": {"sensitivity>=0.95": 0.3, "youden": 0.5}}
    calibrated_file = calibrated.save(tmp_path / "calibrated.safetensors")
    plain_out, out = tmp_path / "plain", tmp_path / "calibrated"
    assert _evaluate(model_file, manifest, "--out", plain_out, "--n-resamples", 20) == 0
    assert _evaluate(calibrated_file, manifest, "--out", out, "--n-resamples", 20) == 0
    plain, metrics = _check_report(plain_out), _check_report(out)
    assert "operating_points" not in plain and "calibration" not in plain
    # ECE and Brier before calibration are those of the same model at T = 1, after it those reported.
    calibration = metrics["calibration"]
    assert calibration["temperature"] == 4.0 and calibration["fitted_on"] == "validation"
    assert calibration["ece_uncalibrated"] == pytest.approx(plain["ece"], abs=1e-9)
    assert calibration["brier_uncalibrated"] == pytest.approx(plain["brier"], abs=1e-9)
    assert calibration["ece_calibrated"] == metrics["ece"]
    assert calibration["brier_calibrated"] == metrics["brier"]
    assert calibration["ece_calibrated"] != pytest.approx(calibration["ece_uncalibrated"], abs=1e-3)
    assert (f"ECE {plain['ece']:.3f} uncalibrated → {metrics['ece']:.3f} calibrated, "
            f"Brier {plain['brier']:.3f} → {metrics['brier']:.3f}") in (out / "report.md").read_text()
    points = metrics["operating_points"]["points"]
    assert {k: p["threshold"] for k, p in points.items()} == {"sensitivity>=0.95": 0.3, "youden": 0.5}
    rows = {r["path"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    plain_rows = {r["path"]: r for r in csv.DictReader((plain_out / "predictions.csv").open())}
    for path, row in rows.items():  # softmax(logits / 4) of two classes: logit gap divided by 4
        p, q = float(plain_rows[path]["p_malignant"]), float(row["p_malignant"])
        expected = 1 / (1 + ((1 - p) / p) ** 0.25)
        assert q == pytest.approx(expected, abs=2e-5)
    assert "Operating points (malignant vs the rest)" in (out / "report.md").read_text()
