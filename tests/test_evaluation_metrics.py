"""Metrics equal scikit-learn's and the hand-computed values of paper 000's patient-level formulas."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from breastvision.errors import BreastvisionError
from breastvision.evaluation.metrics import compute_metrics, positive_index

CLASSES3 = ["normal", "benign", "malignant"]


@pytest.fixture()
def three_class() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    logits = rng.normal(size=(120, 3))
    logits[np.arange(120), y] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_multiclass_metrics_equal_sklearn(three_class):
    y, probs = three_class
    pred = probs.argmax(axis=1)
    m = compute_metrics(y, probs, CLASSES3)
    assert m["task"] == "multiclass"
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["precision_macro"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["recall_macro"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["auc_average"] == "macro one-vs-rest over 3 of 3 classes"
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    per_class_recall = recall_score(y, pred, average=None)
    for k, name in enumerate(CLASSES3):
        assert m["per_class"][name]["recall"] == pytest.approx(per_class_recall[k])
        assert m["per_class"][name]["support"] == int((y == k).sum())
        assert m["per_class"][name]["auc"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    assert "sensitivity" not in m and "patient" not in m


def test_binary_hand_computed():
    # benign=0, malignant=1; 3 malignant (2 caught), 3 benign (1 false alarm).
    y = np.array([1, 1, 1, 0, 0, 0])
    p_mal = np.array([0.9, 0.8, 0.3, 0.6, 0.2, 0.1])
    probs = np.c_[1 - p_mal, p_mal]
    m = compute_metrics(y, probs, ["benign", "malignant"])
    assert m["positive_class"] == "malignant"
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Pairs (malignant, benign) ranked correctly: 0.9 and 0.8 beat all 3, 0.3 beats 2 -> 8/9.
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["auc_average"] == "binary (malignant vs benign)"
    assert m["confusion_matrix"] == [[2, 1], [1, 2]]


def test_positive_class_choice():
    assert positive_index(["malignant", "benign"]) == 0
    assert positive_index(["a", "b"]) == 1
    assert positive_index(["a", "b"], "A") == 0
    with pytest.raises(BreastvisionError, match="positive class"):
        positive_index(["a", "b"], "c")


def test_patient_level_hand_example():
    # Patient A: 3 of 4 correct, patient B: 1 of 2 -> P_arp = (0.75 + 0.5) / 2, P_img = 4 / 6.
    y = np.array([1, 1, 1, 1, 0, 0])
    pred = np.array([1, 1, 1, 0, 0, 1])
    probs = np.eye(2)[pred] * 0.8 + 0.1
    groups = ["A", "A", "A", "A", "B", "B"]
    patient = compute_metrics(y, probs, ["benign", "malignant"], groups)["patient"]
    assert patient["P_arp"] == pytest.approx(0.625)
    assert patient["P_img"] == pytest.approx(4 / 6)
    assert patient["n_patients"] == 2
    assert patient["per_patient"]["A"] == {"n_images": 4, "n_correct": 3, "P_rp": 0.75, "true_labels": [1],
                                           "diagnosis": 1}
    assert patient["per_patient"]["B"]["P_rp"] == pytest.approx(0.5)


def test_patient_diagnosis_follows_the_mean_probability_not_the_image_majority():
    # Patient A (malignant): two images weakly benign, one strongly malignant -> mean P(m) 0.6,
    # diagnosed malignant though most images are wrong. Patient B (benign): mean P(m) 0.3 -> right.
    # Patient C (benign): mean P(m) 0.55 -> wrong. Over patients: 2 of 3 right.
    p_malignant = np.array([0.45, 0.45, 0.9, 0.2, 0.4, 0.55, 0.55])
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    groups = ["A", "A", "A", "B", "B", "C", "C"]
    probs = np.c_[1 - p_malignant, p_malignant]
    patient = compute_metrics(y, probs, ["benign", "malignant"], groups)["patient"]
    assert patient["per_patient"]["A"]["P_rp"] == pytest.approx(1 / 3)
    assert [patient["per_patient"][g]["diagnosis"] for g in "ABC"] == [1, 0, 1]
    diagnosis = patient["diagnosis"]
    assert diagnosis["n_patients"] == 3
    assert diagnosis["accuracy"] == pytest.approx(2 / 3)
    assert diagnosis["sensitivity"] == 1.0 and diagnosis["specificity"] == 0.5
    assert diagnosis["recall_macro"] == 0.75
    assert diagnosis["auc"] == pytest.approx(roc_auc_score([1, 0, 0], [0.6, 0.3, 0.55]))


def test_absent_class_gives_none_auc_with_reason(three_class):
    y, probs = three_class
    keep = y != 0  # no "normal" image left
    m = compute_metrics(y[keep], probs[keep], CLASSES3)
    assert m["per_class"]["normal"]["auc"] is None
    assert "absent" in m["per_class"]["normal"]["auc_note"]
    assert m["per_class"]["normal"]["support"] == 0
    assert m["auc_average"] == "macro one-vs-rest over 2 of 3 classes"
    expected = np.mean([roc_auc_score(y[keep] == k, probs[keep][:, k]) for k in (1, 2)])
    assert m["auc"] == pytest.approx(expected)
    assert "normal" in m["auc_note"]


def test_single_class_binary_auc_is_none():
    # An external set of malignant slides only: accuracy and sensitivity exist, AUC does not.
    probs = np.array([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])
    m = compute_metrics([1, 1, 1], probs, ["benign", "malignant"], ["p1", "p1", "p2"])
    assert m["auc"] is None and "undefined" in m["auc_note"]
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["patient"]["P_arp"] == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.parametrize(
    ("y", "probs", "names", "message"),
    [
        ([0, 1], np.ones((3, 2)) / 2, ["a", "b"], "shape"),
        ([0, 2], np.ones((2, 2)) / 2, ["a", "b"], "labels must lie"),
        ([0.0, 1.0], np.ones((2, 2)) / 2, ["a", "b"], "integer"),
        ([], np.ones((0, 2)), ["a", "b"], "0 images"),
        ([0, 1], np.array([[np.nan, 1], [0, 1]]), ["a", "b"], "NaN"),
        ([0, 0], np.ones((2, 1)), ["a"], "two classes"),
    ],
)
def test_input_errors_are_user_errors(y, probs, names, message):
    with pytest.raises(BreastvisionError, match=message):
        compute_metrics(np.asarray(y), probs, names)


def test_macro_over_present_classes_on_a_two_class_subset_of_a_three_class_model():
    # The external folder: benign and malignant only, the model also knows "normal".
    # Benign: 2 of 4 right (one called normal, one malignant) -> recall 0.5; malignant: 3 of 4
    # right (one called normal) -> 0.75. Macro recall (0.5 + 0.75) / 2 = 0.625, not the
    # (0.5 + 0.75 + 0) / 3 = 0.417 that counting the absent class gives.
    names = ["benign", "malignant", "normal"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 2, 1, 1, 1, 1, 2])
    probs = np.eye(3)[pred] * 0.7 + 0.1
    m = compute_metrics(y, probs, names)
    assert m["recall_macro"] == pytest.approx(0.625)
    assert recall_score(y, pred, labels=[0, 1, 2], average="macro", zero_division=0) == pytest.approx(5 / 12)
    assert m["absent_classes"] == ["normal"]
    assert m["macro_average"] == "over the 2 of 3 classes present in the true labels"
    # Precision: benign 2/2, malignant 3/4; the two "normal" predictions are errors, not a class.
    assert m["precision_macro"] == pytest.approx((1.0 + 0.75) / 2)
    assert m["precision_macro"] == pytest.approx(precision_score(y, pred, labels=[0, 1], average="macro"))
    assert m["f1_macro"] == pytest.approx(f1_score(y, pred, labels=[0, 1], average="macro"))
    assert m["per_class"]["normal"]["recall"] is None and m["per_class"]["normal"]["f1"] is None
    assert m["per_class"]["normal"]["precision"] == 0.0  # predicted twice, wrong both times
    assert m["accuracy"] == pytest.approx(5 / 8)


def test_nothing_absent_when_every_class_is_present(three_class):
    y, probs = three_class
    m = compute_metrics(y, probs, CLASSES3)
    assert m["absent_classes"] == []
    assert m["macro_average"] == "over the 3 of 3 classes present in the true labels"


def test_single_class_binary_has_no_specificity():
    probs = np.array([[0.2, 0.8], [0.7, 0.3]])
    m = compute_metrics([1, 1], probs, ["benign", "malignant"])
    assert m["specificity"] is None and m["absent_classes"] == ["benign"]
    assert m["recall_macro"] == pytest.approx(0.5)
