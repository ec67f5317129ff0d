"""Recall per subtype: the metric, its bootstrap, the predictions column (the cross-validation's
report: test_crossval)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from breastvision.data.records import Record
from breastvision.errors import BreastvisionError
from breastvision.evaluation.report import evaluate_predictions
from breastvision.evaluation.subtypes import subtype_metrics, subtype_statistic
from breastvision.training.run_record import Predictions

NAMES = ["benign", "malignant"]


def _example() -> tuple[np.ndarray, np.ndarray, list[str | None], list[str]]:
    """Fibroadenoma: 1 of 3 called benign; adenosis 2 of 2; ductal carcinoma 2 of 3; one image without."""
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    called = np.array([0, 1, 1, 0, 0, 1, 0, 1, 1])
    probs = np.where(called[:, None] == np.arange(2), 0.8, 0.2)
    subtypes = ["fibroadenoma"] * 3 + ["adenosis"] * 2 + ["ductal_carcinoma"] * 3 + [None]
    groups = ["p1", "p1", "p2", "p3", "p3", "p4", "p4", "p5", "p6"]
    return y, probs, subtypes, groups


def test_recall_of_each_subtype_and_the_patients_it_spans() -> None:
    y, probs, subtypes, groups = _example()
    out = subtype_metrics(y, probs, NAMES, subtypes, groups)
    assert list(out) == ["adenosis", "ductal_carcinoma", "fibroadenoma"]  # the unnamed image left out
    assert out["fibroadenoma"] == {"class": "benign", "n_images": 3, "n_groups": 2, "correct": 1,
                                   "recall": pytest.approx(1 / 3)}
    assert out["adenosis"]["recall"] == 1.0 and out["ductal_carcinoma"]["class"] == "malignant"
    assert out["ductal_carcinoma"]["correct"] == 2
    # A subtype the data files under two classes says so rather than picking one.
    mixed = subtype_metrics(np.array([0, 1]), probs[:2], NAMES, ["odd", "odd"])
    assert mixed["odd"]["class"] == "benign/malignant" and mixed["odd"]["n_groups"] is None
    with pytest.raises(BreastvisionError, match="one per image"):
        subtype_metrics(y, probs, NAMES, subtypes[:-1])


def test_statistic_with_unit_weights_is_the_metric_and_weights_count_images() -> None:
    y, probs, subtypes, _ = _example()
    statistic = subtype_statistic(y, probs, NAMES, subtypes)
    full = statistic(np.ones((1, y.size)))
    assert full["per_subtype.fibroadenoma.recall"][0] == pytest.approx(1 / 3)
    # Drawing the one correct fibroadenoma image twice and dropping one wrong: 2 of 3; a resample
    # without adenosis leaves its recall undefined there.
    weights = np.array([[2, 1, 0, 0, 0, 1, 1, 1, 1]], dtype=float)
    drawn = statistic(weights)
    assert drawn["per_subtype.fibroadenoma.recall"][0] == pytest.approx(2 / 3)
    assert np.isnan(drawn["per_subtype.adenosis.recall"][0])


def test_evaluate_predictions_reports_subtypes_with_patient_intervals() -> None:
    y, probs, subtypes, groups = _example()
    metrics = evaluate_predictions(y, probs, NAMES, groups, grouping="patient", subtypes=subtypes,
                                   n_resamples=200)
    assert metrics["per_subtype"]["fibroadenoma"]["recall"] == pytest.approx(1 / 3)
    interval = metrics["intervals"]["per_subtype.fibroadenoma.recall"]
    assert interval["value"] == pytest.approx(1 / 3) and interval["resampled"] == "patients"
    assert 0 <= interval["ci_low"] <= 1 / 3 <= interval["ci_high"] <= 1
    # Adenosis is one patient's (p3), so it has no interval; ductal carcinoma spans p4 and p5.
    assert "per_subtype.ductal_carcinoma.recall" in metrics["intervals"]
    assert "per_subtype.adenosis.recall" not in metrics["intervals"]
    # The other intervals are those of a run without subtypes: the same resamples.
    plain = evaluate_predictions(y, probs, NAMES, groups, grouping="patient", n_resamples=200)
    assert metrics["intervals"]["accuracy"] == plain["intervals"]["accuracy"]
    assert "per_subtype" not in plain
    assert "per_subtype" not in evaluate_predictions(y, probs, NAMES, subtypes=[None] * y.size, n_resamples=0)


def test_record_subtype_from_breakhis_and_manifest_meta() -> None:
    breakhis = {"subtype": "F", "subtype_name": "fibroadenoma"}
    assert Record(Path("a.png"), 0, "g", breakhis).subtype == "fibroadenoma"
    assert Record(Path("a.png"), 0, "g", {"subtype": "cyst"}).subtype == "cyst"
    assert Record(Path("a.png"), 0, "g", {"subtype": ""}).subtype is None
    assert Record(Path("a.png"), 0, "g").subtype is None


def test_predictions_table_keeps_subtypes(tmp_path: Path) -> None:
    y, probs, subtypes, groups = _example()
    keys = [f"img{i}.png" for i in range(y.size)]
    path = Predictions(keys, groups, y, probs, NAMES, subtypes=subtypes).save(tmp_path / "with.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0])[:4] == ["path", "true_label", "group", "subtype"]
    assert [r["subtype"] for r in rows] == [s or "" for s in subtypes]
    assert Predictions.read(path).subtypes == subtypes
    # One column whatever the data: blank, and read back as none, where no image has a subtype.
    bare = Predictions(keys, groups, y, probs, NAMES).save(tmp_path / "bare.csv")
    assert {r["subtype"] for r in csv.DictReader(bare.open())} == {""}
    assert Predictions.read(bare).subtypes is None
