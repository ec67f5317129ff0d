"""The report folder: files exist, report.md's links resolve, plots are PNGs, tables render."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from breastvision.errors import BreastvisionError
from breastvision.evaluation import plots
from breastvision.evaluation.report import (
    comparison_table,
    evaluate_predictions,
    format_value,
    print_headline,
    with_interval,
    write_report,
)
from breastvision.training.run_record import Predictions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["benign", "malignant"]


@pytest.fixture()
def predictions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p_mal = np.clip(0.4 * y + 0.6 * rng.random(60), 0, 1)
    groups = np.array([f"patient{i % 6}" for i in range(60)])
    return y, np.c_[1 - p_mal, p_mal], groups


def _links(markdown: str) -> list[str]:
    return re.findall(r"\]\(([^)]+)\)", markdown)


def test_evaluate_predictions_adds_intervals(predictions):
    y, probs, groups = predictions
    m = evaluate_predictions(y, probs, CLASSES, groups, n_resamples=200, seed=1)
    assert m["bootstrap"]["resampled"] == "patients"
    for key in ("accuracy", "auc", "sensitivity", "specificity", "patient.P_arp", "patient.P_img"):
        interval = m["intervals"][key]
        assert interval["ci_low"] <= interval["value"] <= interval["ci_high"], key
    assert m["intervals"]["patient.P_arp"]["value"] == pytest.approx(m["patient"]["P_arp"])
    assert m["intervals"]["auc"]["value"] == pytest.approx(m["auc"])
    assert "intervals" not in evaluate_predictions(y, probs, CLASSES, n_resamples=0)


def test_write_report_folder(tmp_path: Path, predictions):
    y, probs, groups = predictions
    metrics = evaluate_predictions(y, probs, CLASSES, groups, n_resamples=100)
    split_file = tmp_path / "given_split.json"
    split_file.write_text(json.dumps({"protocol": "patient_kfold", "seed": 3, "leaky": True,
                                      "assignment": {"a.png": "test"}}))
    history = tmp_path / "history.csv"
    history.write_text("epoch,train_loss,val_loss,train_acc,val_acc,lr\n"
                       "1,0.9,1.0,0.5,0.45,0.01\n2,0.6,0.8,0.7,0.6,0.01\n3,0.4,,0.8,,0.001\n")
    run = tmp_path / "run"
    paths = [f"img{i}.png" for i in range(60)]
    Predictions(paths, [str(g) for g in groups], y, probs, CLASSES).save(run / "predictions.csv")
    report = write_report(
        run, metrics=metrics, config={"lr": 0.01, "input_size": (224, 224), "data": Path("/x")},
        split_info=split_file, weights_origin={"backbone": "imagenet (keras port)", "head": "random init"},
        lineage=[{"stage": "imagenet"}, {"stage": "lc25000", "checkpoint": "stage2.safetensors"}],
        history=history, y_true=y, probs=probs, facts={"parameters": 7_000_000.0, "best_epoch": 2},
        title="test run",
    )
    text = report.read_text()
    for name in ("metrics.json", "provenance.json", "config.yaml", "split.json", "predictions.csv"):
        assert (run / name).is_file(), name
    links = _links(text)
    for plot in ("accuracy.png", "loss.png", "confusion_matrix.png", "roc.png", "patient_accuracy.png",
                 "precision_recall.png", "reliability.png"):
        assert f"plots/{plot}" in links, plot
    for link in links:
        target = run / link
        assert target.is_file(), link
        if link.endswith(".png"):
            assert target.read_bytes()[:8] == PNG_MAGIC
    assert json.loads((run / "metrics.json").read_text())["patient"]["P_arp"] == metrics["patient"]["P_arp"]
    assert yaml.safe_load((run / "config.yaml").read_text())["input_size"] == [224, 224]
    sha = hashlib.sha256(split_file.read_bytes()).hexdigest()
    assert sha in text and "leaky" in text
    assert "imagenet (keras port)" in text and "stage2.safetensors" in text and "7,000,000" in text
    assert json.loads((run / "provenance.json").read_text())["split"]["sha256"] == sha
    assert "loss per epoch (dotted: best epoch 2)" in text
    for key in ("ece", "brier"):
        assert re.search(rf"\| {key} \| \d\.\d{{3}} \(\d\.\d{{3}}–\d\.\d{{3}}\) \|", text), key


def test_report_without_optional_parts(tmp_path: Path, predictions):
    y, probs, _ = predictions
    report = write_report(tmp_path, metrics=evaluate_predictions(y, probs, CLASSES, n_resamples=0))
    text = report.read_text()
    assert "split file: none" in text and "not recorded" in text
    assert _links(text) == ["plots/confusion_matrix.png", "plots/reliability.png"]
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "split.json").exists()


def test_missing_split_file_is_a_user_error(tmp_path: Path, predictions):
    y, probs, _ = predictions
    with pytest.raises(BreastvisionError, match="split file not found"):
        write_report(tmp_path, metrics=evaluate_predictions(y, probs, CLASSES, n_resamples=0),
                     split_info=tmp_path / "nope.json")


def test_predictions_csv(tmp_path: Path):
    """A run's table is ``predict``'s, plus the truth, group and subtype
    (serving.predict.write_predictions_csv)."""
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    operating = {"positive_class": "malignant", "target_sensitivity": 0.95, "thresholds": {"youden": 0.75}}
    path = Predictions(["a.png", "b.png"], ["x", "y"], np.array([0, 0]), probs, CLASSES, operating,
                       np.array([1.5, 30.0]), 20.0).save(tmp_path / "p.csv")
    rows = list(csv.DictReader(path.open()))
    assert rows[1] == {"path": "b.png", "true_label": "benign", "group": "y", "subtype": "",
                       "predicted": "malignant",
                       "decision": "malignant", "p_benign": "0.300000", "p_malignant": "0.700000",
                       "malignant_at_youden": "False", "out_of_scope": "True", "scope_score": "30.0000",
                       "skipped": ""}
    back = Predictions.read(path)
    assert back.keys == ["a.png", "b.png"] and back.groups == ["x", "y"] and back.class_names == CLASSES
    np.testing.assert_allclose(back.probs, probs)


def test_learning_curves_from_rows(tmp_path: Path):
    rows = [{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5}, {"epoch": 2, "train_loss": 0.5}]
    written = plots.plot_learning_curves(rows, tmp_path)
    assert set(written) == {"accuracy", "loss"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written.values())
    assert plots.plot_learning_curves([{"epoch": 1, "lr": 0.1}], tmp_path / "none") == {}


def test_roc_plot_with_absent_class(tmp_path: Path):
    probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    path = plots.plot_roc([1, 2, 1], probs, ["normal", "benign", "malignant"], tmp_path / "roc.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_comparison_table():
    ours = [{"model": "fusion", "protocol": "leak-free", "accuracy": {"value": 0.81, "ci_low": 0.77,
                                                                      "ci_high": 0.85}, "recall": None}]
    paper = [{"model": "fusion", "protocol": "leaky 8:2", "accuracy": 0.932, "recall": 0.926}]
    table = comparison_table(ours, paper, "CPU-sized setting: 3 epochs, frozen backbones.")
    lines = table.splitlines()
    assert lines[0] == "| source | model | protocol | accuracy | recall |"
    assert lines[2] == "| this run | fusion | leak-free | 0.810 (0.770–0.850) | — |"
    assert lines[3] == "| paper | fusion | leaky 8:2 | 0.932 | 0.926 |"
    assert table.rstrip().endswith("frozen backbones.")
    with pytest.raises(BreastvisionError):
        comparison_table([])


def test_format_value():
    assert format_value(None) == "—"
    assert format_value("a|b") == "a\\|b"
    assert format_value(0.5, 1) == "0.5"
    assert format_value(123456) == "123,456"
    assert format_value({"value": 0.5, "ci_low": None, "ci_high": None}) == "0.500"
    assert format_value(42.69, None) == "42.69"
    assert format_value({"value": 0.5, "ci_low": 0.25, "ci_high": 0.75}, None) == "0.5 (0.25–0.75)"


def test_with_interval_prefers_the_interval_then_the_value():
    interval = {"value": 0.8, "ci_low": 0.7, "ci_high": 0.9}
    metrics = {"accuracy": 0.8, "patient": {"P_arp": 0.75}, "intervals": {"accuracy": interval}}
    assert with_interval(metrics, "accuracy") == interval
    assert with_interval(metrics, "patient.P_arp") == 0.75
    assert with_interval(metrics, "auc") is None
    assert with_interval({"auc": 0.9}, "auc") == 0.9  # no bootstrap at all (n_resamples 0)


def test_report_names_absent_classes(tmp_path: Path, capsys):
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    metrics = evaluate_predictions([0, 1, 1, 0], probs, ["benign", "malignant", "normal"], n_resamples=20)
    text = write_report(tmp_path, metrics=metrics).read_text()
    line = "classes absent from the true labels: normal (macro averages are over the 2 of 3 classes"
    assert line in text
    print_headline(metrics, tmp_path / "report.md")
    assert line in capsys.readouterr().out
    assert "normal | 0 | 0.000 | — | — | —" in text  # no recall, F1 or AUC for the absent class


def test_near_duplicate_groups_are_resampled_whole_without_patient_metrics(tmp_path: Path):
    # BUSI-like: copies of one scan share a group; the errors sit in two of twelve groups. An
    # image bootstrap treats the 20 copies as independent and gives a narrower interval.
    y = np.repeat([0, 1], 120)
    groups = np.repeat([f"scan{i}" for i in range(12)], 20)
    pred = y.copy()
    pred[groups == "scan0"] = 1
    pred[groups == "scan11"] = 0
    probs = np.eye(2)[pred] * 0.8 + 0.1
    by_group = evaluate_predictions(y, probs, CLASSES, groups, grouping="near_duplicate", n_resamples=500)
    by_image = evaluate_predictions(y, probs, CLASSES, groups, grouping="image", n_resamples=500)
    assert "patient" not in by_group and "patient.P_arp" not in by_group["intervals"]
    assert by_group["bootstrap"]["resampled"] == "near-duplicate groups"
    assert by_group["bootstrap"]["n_groups"] == 12
    assert by_image["bootstrap"]["resampled"] == "images" and "n_groups" not in by_image["bootstrap"]
    width = {name: m["intervals"]["accuracy"]["ci_high"] - m["intervals"]["accuracy"]["ci_low"]
             for name, m in (("group", by_group), ("image", by_image))}
    assert width["group"] > 2 * width["image"]
    text = write_report(tmp_path, metrics=by_group).read_text()
    assert "resamples of the 12 near-duplicate groups, each drawn with all of its images" in text
    # Patients stay patients; --patient-level off keeps their grouping for the bootstrap.
    as_slides = evaluate_predictions(y, probs, CLASSES, groups, grouping="slide", n_resamples=50)
    assert as_slides["bootstrap"]["resampled"] == "patients" and as_slides["patient"]["n_patients"] == 12
    off = evaluate_predictions(y, probs, CLASSES, groups, grouping="slide", patient_level=False,
                               n_resamples=50)
    assert off["bootstrap"]["resampled"] == "groups (slide)" and "patient" not in off


def test_patient_level_on_makes_any_groups_patients():
    y, probs = np.array([0, 1, 1, 0]), np.eye(2)[[0, 1, 0, 0]] * 0.8 + 0.1
    m = evaluate_predictions(y, probs, CLASSES, ["a", "a", "b", "b"], grouping="image", patient_level=True,
                             n_resamples=20)
    assert m["patient"]["n_patients"] == 2 and m["bootstrap"]["resampled"] == "patients"
    assert "patient" not in evaluate_predictions(y, probs, CLASSES, None, patient_level=True, n_resamples=0)
