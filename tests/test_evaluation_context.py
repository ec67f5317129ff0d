"""Patient context: each image blended with its patient's mean, the weight chosen on validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from breastvision.errors import BreastvisionError
from breastvision.evaluation.context import choose_weight, in_context, with_patient_context
from breastvision.reproduce.ablation import Context, context_folds
from breastvision.training.run_record import Predictions, RunFacts, RunRecord, SplitRef

CLASSES = ["benign", "malignant"]


def _probs(malignant: list[float]) -> np.ndarray:
    m = np.array(malignant)
    return np.stack([1 - m, m], axis=1)


def test_weights_blend_each_image_with_its_patients_mean() -> None:
    probs = _probs([0.9, 0.3, 0.3, 0.2, 0.6])
    groups = ["a", "a", "a", "b", "c"]
    assert np.array_equal(with_patient_context(probs, groups, 0.0), probs)
    whole = with_patient_context(probs, groups, 1.0)
    np.testing.assert_allclose(whole[:3, 1], 0.5)  # patient a's mean for each of its images
    np.testing.assert_allclose(whole[3:], probs[3:])  # a patient of one image keeps its own
    half = with_patient_context(probs, groups, 0.5)
    np.testing.assert_allclose(half[:3, 1], [0.7, 0.4, 0.4])
    np.testing.assert_allclose(half.sum(axis=1), 1.0)


def test_bad_weights_and_shapes_are_refused() -> None:
    with pytest.raises(BreastvisionError, match=r"\[0, 1\]"):
        with_patient_context(_probs([0.5]), ["a"], 1.5)
    with pytest.raises(BreastvisionError, match="one group per image"):
        with_patient_context(_probs([0.5, 0.4]), ["a"], 0.5)


def test_in_context_keeps_keys_and_drops_the_model_files_decisions() -> None:
    pred = Predictions(["x.png", "y.png"], ["p1", "p1"], np.array([0, 1]), _probs([0.2, 0.6]), CLASSES,
                       operating_points={"balanced": {"threshold": 0.5}}, scope_scores=np.array([1.0, 2.0]),
                       scope_threshold=3.0)
    out = in_context(pred, 1.0)
    assert out.keys == pred.keys and out.groups == pred.groups and out.operating_points is None
    assert out.scope_scores is None and out.scope_threshold is None
    np.testing.assert_allclose(out.probs[:, 1], [0.4, 0.4])


def _fold(prefix: str) -> Predictions:
    """Two patients of three images: each has one misread image its neighbours outvote."""
    y = np.array([0, 0, 0, 1, 1, 1])
    return Predictions([f"{prefix}{i}.png" for i in range(6)], [f"{prefix}b"] * 3 + [f"{prefix}m"] * 3, y,
                       _probs([0.1, 0.2, 0.7, 0.9, 0.8, 0.4]), CLASSES)


def test_the_weight_is_chosen_on_validation_ties_to_the_smaller() -> None:
    weight, scores = choose_weight([_fold("v0"), _fold("v1")], [1.0, 0.0, 0.5, 0.75], "accuracy")
    assert scores[0.0] == pytest.approx(4 / 6) and scores[0.5] == pytest.approx(5 / 6)
    assert scores[1.0] == pytest.approx(1.0) and weight == 0.75 and scores[0.75] == pytest.approx(1.0)
    weight, _ = choose_weight([_fold("v0")], [0.0, 1.0], "patient.P_arp")
    assert weight == 1.0
    with pytest.raises(BreastvisionError, match="not a number"):
        choose_weight([_fold("v0")], [0.0], "per_class")


def _record(tmp_path: Path, fold: int, grouping: str) -> RunRecord:
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"protocol": "group_kfold", "grouping": grouping}))
    split = SplitRef(split_file, "0" * 64, "group_kfold", False, grouping)
    facts = RunFacts(wall_clock_seconds_this_session=60.0)
    return RunRecord(tmp_path / f"fold{fold}", None, split, {}, facts,
                     predictions=_fold(f"t{fold}"), val_predictions=_fold(f"v{fold}"))


def test_an_ablation_context_step_applies_the_validation_choice_to_the_test_folds(tmp_path: Path) -> None:
    runs = [_record(tmp_path, k, "patient") for k in range(2)]
    summary, records = context_folds(runs, Context(of="base", weights=[0.0, 1.0], metric="accuracy"),
                                     tmp_path / "ctx", "context")
    assert summary["context_weight"] == 1.0 and summary["wall_clock_seconds"] == 120.0
    assert summary["pooled"]["accuracy"] == summary["validation"]["accuracy"] == pytest.approx(1.0)
    choice = json.loads((tmp_path / "ctx" / "context.json").read_text())
    assert choice["validation"] == {"0.0": 4 / 6, "1.0": 1.0} and choice["weight"] == 1.0
    np.testing.assert_allclose(records[0].predictions.probs[:3, 1], np.mean([0.1, 0.2, 0.7]))
    with pytest.raises(BreastvisionError, match="not patients"):
        context_folds([_record(tmp_path, 0, "near_duplicate")], Context(of="busi"), tmp_path / "x", "x")
