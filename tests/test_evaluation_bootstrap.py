"""Bootstrap intervals: the batched statistics equal scikit-learn, patients are resampled whole."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from breastvision.errors import BreastvisionError
from breastvision.evaluation.bootstrap import (
    bootstrap,
    classification_statistic,
    resample_weights,
    resampling_unit,
    weighted_auc,
    with_sample_weight,
)
from breastvision.evaluation.metrics import compute_metrics

CLASSES3 = ["normal", "benign", "malignant"]


def _predictions(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.0
    # Rounded so that tied scores occur, which the AUC must count one half.
    return y, np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 2)


def test_weighted_auc_equals_sklearn_with_sample_weight():
    y, probs = _predictions(300, 3, seed=1)
    weights = np.random.default_rng(2).integers(0, 4, size=(5, 300)).astype(float)
    batched = weighted_auc(y == 2, probs[:, 2])(weights)
    for w, value in zip(weights, batched, strict=True):
        assert value == pytest.approx(roc_auc_score(y == 2, probs[:, 2], sample_weight=w))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_statistic_at_unit_weights_equals_compute_metrics(n_classes):
    y, probs = _predictions(200, n_classes, seed=4)
    names = CLASSES3 if n_classes == 3 else ["benign", "malignant"]
    groups = [f"p{i % 17}" for i in range(200)]
    metrics = compute_metrics(y, probs, names, groups)
    values = classification_statistic(y, probs, names, groups)(np.ones((1, 200)))
    for key, value in values.items():
        node = metrics
        for part in key.split("."):
            node = node[part]
        assert value[0] == pytest.approx(node), key


def test_resampled_statistic_equals_metrics_of_the_resampled_data():
    # A bootstrap resample with integer weights is the data with images repeated.
    y, probs = _predictions(80, 3, seed=5)
    groups = np.array([f"p{i % 9}" for i in range(80)])
    weights = next(resample_weights(80, groups, n_resamples=1, seed=6))[0]
    repeated = np.repeat(np.arange(80), weights.astype(int))
    values = classification_statistic(y, probs, CLASSES3, groups)(weights[None])
    direct = compute_metrics(y[repeated], probs[repeated], CLASSES3)
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "brier", "ece"):
        assert values[key][0] == pytest.approx(direct[key]), key
    # P_arp over drawn patients, a patient drawn twice counting twice.
    _, codes = np.unique(groups, return_inverse=True)
    counts = np.bincount(codes, weights=weights) / np.bincount(codes)
    p_rp = compute_metrics(y, probs, CLASSES3, groups)["patient"]["per_patient"]
    expected = sum(c * p_rp[g]["P_rp"] for g, c in zip(np.unique(groups), counts, strict=True)) / counts.sum()
    assert values["patient.P_arp"][0] == pytest.approx(expected)


def test_resampled_patient_diagnosis_equals_the_diagnosis_of_the_drawn_patients():
    y, probs = _predictions(90, 2, seed=8)
    groups = np.array([f"p{i % 11}" for i in range(90)])
    y = (np.unique(groups, return_inverse=True)[1] % 3 > 0).astype(int)  # one class per patient
    names = ["benign", "malignant"]
    weights = next(resample_weights(90, groups, n_resamples=1, seed=3))[0]
    values = classification_statistic(y, probs, names, groups)(weights[None])
    diagnosis = compute_metrics(y, probs, names, groups)["patient"]["per_patient"]
    # Each drawn copy of a patient is one more patient with that patient's diagnosis.
    patients = [g for g in np.unique(groups) for _ in range(int(weights[groups == g][0]))]
    truth = np.array([y[groups == g][0] for g in patients])
    guess = np.array([diagnosis[g]["diagnosis"] for g in patients])
    assert values["patient.diagnosis.accuracy"][0] == pytest.approx((truth == guess).mean())
    assert values["patient.diagnosis.specificity"][0] == pytest.approx((guess[truth == 0] == 0).mean())
    mean_p = np.array([probs[groups == g, 1].mean() for g in patients])
    assert values["patient.diagnosis.auc"][0] == pytest.approx(roc_auc_score(truth, mean_p))


def test_patient_resampling_draws_whole_patients():
    groups = np.repeat(["a", "b", "c", "d"], [1, 2, 3, 4])
    for weights in resample_weights(10, groups, n_resamples=50, seed=0):
        for g in np.unique(groups):
            assert np.unique(weights[:, groups == g], axis=1).shape[1] == 1  # same count within a patient
        # Four patients are drawn per resample; their image counts add up accordingly.
        drawn = weights[:, [0, 1, 3, 6]]
        assert (drawn.sum(axis=1) == 4).all()


def test_interval_contains_value_and_is_reproducible():
    y, probs = _predictions(300, 3, seed=7)
    statistic = classification_statistic(y, probs, CLASSES3)
    first = bootstrap(statistic, 300, n_resamples=200, seed=11)
    again = bootstrap(statistic, 300, n_resamples=200, seed=11)
    assert first == again
    for key, result in first.items():
        assert result["ci_low"] <= result["value"] <= result["ci_high"], key
        assert result["resampled"] == "images" and result["n_resamples"] == 200
    assert first["accuracy"]["ci_high"] - first["accuracy"]["ci_low"] > 0.02


def test_patient_bootstrap_is_wider_when_errors_cluster_in_one_patient():
    # Ten patients of 20 images; patient 0 is all wrong, the others all right. Images look
    # independent to an image bootstrap; the patient bootstrap sees one bad patient in ten.
    y = np.ones(200, dtype=int)
    pred = np.ones(200, dtype=int)
    pred[:20] = 0
    probs = np.eye(2)[pred] * 0.9 + 0.05
    groups = np.repeat([f"p{i}" for i in range(10)], 20)
    statistic = classification_statistic(y, probs, ["benign", "malignant"], groups)
    by_patient = bootstrap(statistic, 200, groups=groups, unit="patients", n_resamples=1000, seed=0)
    by_patient = by_patient["accuracy"]
    by_image = bootstrap(statistic, 200, n_resamples=1000, seed=0)["accuracy"]
    assert by_patient["resampled"] == "patients" and by_image["resampled"] == "images"
    assert by_patient["value"] == by_image["value"] == pytest.approx(0.9)
    # Accuracy under the patient bootstrap moves in steps of 1/10 (a whole patient at a time).
    assert by_patient["ci_high"] - by_patient["ci_low"] > 2 * (by_image["ci_high"] - by_image["ci_low"])
    assert by_patient["ci_low"] <= 0.7 + 1e-9


def test_undefined_resamples_are_counted_not_fatal():
    # One positive image: resamples that miss it have no AUC.
    y = np.r_[1, np.zeros(9, dtype=int)]
    probs = np.c_[np.linspace(0.9, 0.1, 10), np.linspace(0.1, 0.9, 10)]
    result = bootstrap(weighted_auc(y == 1, probs[:, 1]), 10, n_resamples=300, seed=0)
    assert 0 < result["n_undefined"] < 300
    assert result["ci_low"] is not None


def test_with_sample_weight_wraps_any_sklearn_metric():
    y, probs = _predictions(100, 2, seed=8)
    pred = probs.argmax(axis=1)
    result = bootstrap(with_sample_weight(accuracy_score, y, pred), 100, n_resamples=50, seed=1)
    assert result["value"] == pytest.approx(accuracy_score(y, pred))
    fast = bootstrap(classification_statistic(y, probs, ["a", "b"]), 100, n_resamples=50, seed=1)
    assert result["ci_low"] == pytest.approx(fast["accuracy"]["ci_low"])
    assert result["ci_high"] == pytest.approx(fast["accuracy"]["ci_high"])


def test_thousand_resamples_are_fast():
    y, probs = _predictions(714, 3, seed=9)
    groups = [f"p{i % 40}" for i in range(714)]
    statistic = classification_statistic(y, probs, CLASSES3, groups)
    start = time.perf_counter()
    bootstrap(statistic, 714, groups=groups, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 2.0


def test_bad_arguments():
    with pytest.raises(BreastvisionError, match="n_resamples"):
        next(resample_weights(10, n_resamples=0))
    with pytest.raises(BreastvisionError, match="confidence"):
        bootstrap(lambda w: w.sum(axis=1), 10, confidence=1.5)


def test_macro_intervals_skip_classes_absent_from_the_data_and_from_a_resample():
    # A three-class model on benign / malignant images only: the statistic's macro recall is the
    # macro over present classes, also in resamples, which equal compute_metrics of the repeated data.
    y, probs = _predictions(60, 2, seed=12)
    probs3 = np.c_[probs * 0.8, np.full(60, 0.2)]
    probs3[::7] = [0.1, 0.1, 0.8]  # a few "normal" predictions: errors of the classes present
    names = ["benign", "malignant", "normal"]
    statistic = classification_statistic(y, probs3, names)
    assert statistic(np.ones((1, 60)))["recall_macro"][0] == pytest.approx(
        compute_metrics(y, probs3, names)["recall_macro"])
    assert "per_class.normal.recall" not in statistic(np.ones((1, 60)))
    # A resample holding only benign images: macro over that one class, no malignant recall.
    weights = (y == 0).astype(float)[None]
    values = statistic(weights)
    direct = compute_metrics(y[y == 0], probs3[y == 0], names)
    assert values["recall_macro"][0] == pytest.approx(direct["recall_macro"])
    assert values["precision_macro"][0] == pytest.approx(direct["precision_macro"])
    assert np.isnan(values["per_class.malignant.recall"][0])


def test_resampling_unit_names_what_was_drawn():
    assert resampling_unit(None) == resampling_unit("image") == "images"
    assert resampling_unit("slide") == resampling_unit("patient_id") == "patients"
    assert resampling_unit("near_duplicate") == "near-duplicate groups"
    assert resampling_unit("near_duplicate", patients=True) == "patients"  # --patient-level on
    assert resampling_unit("slide", patients=False) == "groups (slide)"
    assert resampling_unit("tile_group") == "groups (tile_group)" and resampling_unit("group") == "groups"
