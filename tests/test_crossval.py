"""Cross-validation on tiny generated images: pooled metrics, resume, refusal of mixed set-ups."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from breastvision.errors import BreastvisionError
from breastvision.evaluation.report import evaluate_predictions
from breastvision.training import crossval, engine
from breastvision.training.crossval import aggregate_runs, run_crossval
from breastvision.training.run_record import RunRecord


def write_config(path: Path, source: Path, **data: object) -> Path:
    """ResNet-18 at 32×32, only the classifier trained: a fold takes about a second."""
    raw = {
        "name": "tiny_cv",
        "data": {"source": str(source), "input_size": 32, "resize": 36,
                 "split": {"protocol": "group_kfold", "options": {"k": 3}}, **data},
        "model": {"name": "resnet18", "first_trainable_stage": "head"},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.01, "cache_dir": None, "progress": "none"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def spy(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records every engine.train call (and still trains)."""
    calls: list[dict] = []
    real = engine.train

    def recording(config, resume=None, out=None):
        calls.append({"fold": config.data.fold, "resume": resume, "out": out})
        return real(config, resume=resume, out=out)

    monkeypatch.setattr(engine, "train", recording)
    return calls


def test_pooled_metrics_are_those_of_the_concatenated_folds(image_tree, tmp_path: Path, spy) -> None:
    source = image_tree(per_class=6)
    cv = run_crossval(write_config(tmp_path / "cv.yaml", source), folds=3, out=tmp_path / "cv")
    out = cv.out_dir
    assert [r.run_dir for r in cv.runs] == [out / f"fold{k}" for k in range(3)]
    assert [c["fold"] for c in spy] == [0, 1, 2]
    folds = [out / f"fold{k}" for k in range(3)]
    parts = [RunRecord.load(d).predictions for d in folds]
    keys = [k for p in parts for k in p.keys]
    # Out of fold: every image is tested once, by exactly one fold.
    assert sorted(keys) == sorted(p.relative_to(source).as_posix() for p in source.rglob("*.png"))
    y = np.concatenate([p.y_true for p in parts])
    probs = np.concatenate([p.probs for p in parts])
    expected = evaluate_predictions(y, probs, parts[0].class_names)
    summary = json.loads((out / "crossval.json").read_text())
    assert summary["pooled"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert summary["pooled"]["auc"] == pytest.approx(expected["auc"])
    pooled_ci = summary["pooled"]["intervals"]["recall_macro"]
    assert pooled_ci == pytest.approx(expected["intervals"]["recall_macro"])
    assert summary["pooled"]["confusion_matrix"] == expected["confusion_matrix"]
    per_fold_acc = [json.loads((d / "metrics.json").read_text())["accuracy"] for d in folds]
    assert summary["mean_sd"]["accuracy"]["mean"] == pytest.approx(np.mean(per_fold_acc))
    assert summary["mean_sd"]["accuracy"]["sd"] == pytest.approx(np.std(per_fold_acc, ddof=1))
    # ECE on each held-out test fold before and after its validation-fitted temperature.
    before = [json.loads((d / "metrics.json").read_text())["calibration"]["ece_uncalibrated"] for d in folds]
    assert summary["mean_sd"]["calibration.ece_uncalibrated"]["mean"] == pytest.approx(np.mean(before))
    assert summary["mean_sd"]["ece"]["n"] == 3
    # Recipes are compared on the folds' validation predictions, never on the pooled test ones.
    val_parts = [RunRecord.load(d).val_predictions for d in folds]
    assert all(not set(v.keys) & set(t.keys) for v, t in zip(val_parts, parts, strict=True))
    val_y = np.concatenate([p.y_true for p in val_parts])
    val_expected = evaluate_predictions(val_y, np.concatenate([p.probs for p in val_parts]),
                                        parts[0].class_names, n_resamples=0)
    assert summary["validation"]["n_images"] == len(val_y)
    assert summary["validation"]["accuracy"] == pytest.approx(val_expected["accuracy"])
    assert summary["validation"]["recall"] == pytest.approx(
        {c: v["recall"] for c, v in val_expected["per_class"].items()})
    report = (out / "report.md").read_text()
    assert "## Folds" in report and all(str(d) in report for d in folds)
    sha = summary["per_fold"][0]["split_sha256"]
    assert sha in report and len(sha) == 64

    # A second run reuses the finished folds and re-trains nothing.
    spy.clear()
    run_crossval(tmp_path / "cv.yaml", folds=3, out=out)
    assert spy == []

    # An interrupted fold (checkpoint, no model yet) is resumed, not restarted.
    (folds[2] / "model.safetensors").unlink()
    run_crossval(tmp_path / "cv.yaml", folds=3, out=out)
    assert [(c["fold"], c["resume"]) for c in spy] == [(2, folds[2] / "checkpoints" / "last.ckpt")]
    assert (folds[2] / "model.safetensors").is_file()

    # Speed settings may differ; anything that changes results may not.
    run_crossval(tmp_path / "cv.yaml", folds=3, overrides=["train.threads=1"], out=out)
    with pytest.raises(BreastvisionError, match="different configuration"):
        run_crossval(tmp_path / "cv.yaml", folds=3, overrides=["train.lr=0.1"], out=out)

    # The same run twice is not a cross-validation: its test images would count twice.
    with pytest.raises(BreastvisionError, match="more than one run"):
        aggregate_runs([folds[0], folds[0]], tmp_path / "twice")


def test_crossval_pools_and_reports_subtypes(image_tree, tmp_path: Path) -> None:
    """A manifest's subtype column reaches the pooled predictions, metrics and report."""
    import csv
    import shutil

    from breastvision.evaluation.subtypes import subtype_metrics
    from breastvision.training.run_record import Predictions

    source = shutil.copytree(image_tree(per_class=6), tmp_path / "data")
    manifest = source / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "subtype"])
        for i, image in enumerate(sorted(source.rglob("*.png"))):
            label = image.parent.name
            writer.writerow([image.relative_to(source).as_posix(), label, f"{label}_{'ab'[i % 2]}"])
    cv = run_crossval(write_config(tmp_path / "cv.yaml", manifest), folds=3, out=tmp_path / "cv")
    pooled = Predictions.read(cv.out_dir / "predictions.csv")
    assert sorted(set(pooled.subtypes)) == ["benign_a", "benign_b", "malignant_a", "malignant_b"]
    expected = subtype_metrics(pooled.y_true, pooled.probs, pooled.class_names, pooled.subtypes)
    summary = json.loads((cv.out_dir / "crossval.json").read_text())
    assert {k: v["recall"] for k, v in summary["pooled"]["per_subtype"].items()} == pytest.approx(
        {k: v["recall"] for k, v in expected.items()})
    assert "per_subtype.benign_a.recall" in summary["pooled"]["intervals"]
    report = (cv.out_dir / "report.md").read_text()
    assert "### Per subtype" in report and "| benign_b | benign |" in report
    # ``evaluate`` of a fold's model file on its test part reports the same breakdown.
    from breastvision.evaluation.evaluate import evaluate_model

    fold = cv.runs[0].run_dir
    evaluation = evaluate_model(fold / "model.safetensors", str(manifest), split=fold / "split.json",
                                fold=0, out=tmp_path / "evaluate", n_resamples=0)
    tested = RunRecord.load(fold).predictions
    assert Predictions.read(tmp_path / "evaluate" / "predictions.csv").subtypes == tested.subtypes
    expected = subtype_metrics(tested.y_true, tested.probs, tested.class_names, tested.subtypes)
    assert {k: v["correct"] for k, v in evaluation.metrics["per_subtype"].items()} == {
        k: v["correct"] for k, v in expected.items()}


def test_refuses_a_hold_out_config(image_tree, tmp_path: Path) -> None:
    config = write_config(tmp_path / "holdout.yaml", image_tree(), split={"protocol": "group_holdout"})
    with pytest.raises(BreastvisionError, match="group_kfold"):
        run_crossval(config, folds=3, out=tmp_path / "cv")
    with pytest.raises(BreastvisionError, match="at least 2 folds"):
        run_crossval(config, folds=1, out=tmp_path / "cv")


def test_patient_groupings_pool_per_patient(tmp_path: Path) -> None:
    """Folds split by patient get patient-level pooled metrics, resampling patients."""
    from breastvision.training.run_record import Predictions

    rng = np.random.default_rng(0)
    folds = []
    for k in range(2):
        run = tmp_path / f"fold{k}"
        run.mkdir()
        y = np.array([0, 1, 0, 1, 1, 0])
        p = rng.dirichlet([1, 1], size=6)
        Predictions([f"f{k}_{i}.png" for i in range(6)], [f"p{k}{i // 2}" for i in range(6)], y, p,
                    ["benign", "malignant"]).save(run / "predictions.csv")
        (run / "split.json").write_text(json.dumps({"grouping": "patient", "protocol": "group_kfold"}))
        folds.append(run)
    summary = aggregate_runs(folds, tmp_path / "pooled", n_resamples=50)
    assert summary["pooled"]["patient"]["n_patients"] == 6
    assert summary["pooled"]["bootstrap"]["resampled"] == "patients"
    assert summary["wall_clock_seconds"] is None and (tmp_path / "pooled" / "report.md").is_file()
    assert crossval.fold_overrides(5, 3) == ["data.split.options.k=5", "data.fold=3"]


def test_ensemble_of_the_folds(image_tree, tmp_path: Path) -> None:
    from breastvision.models.bundle import ModelBundle

    source = image_tree(per_class=6)
    cv = run_crossval(write_config(tmp_path / "cv.yaml", source), folds=3, out=tmp_path / "cv", ensemble=True)
    bundle = ModelBundle.load(cv.out_dir / "ensemble.safetensors")
    members = [ModelBundle.load(r.run_dir / "model.safetensors") for r in cv.runs]
    assert [m["calibration"] for m in bundle.ensemble["members"]] == [m.calibration for m in members]
    assert bundle.state_dict["member2.fc.bias"].equal(members[2].state_dict["fc.bias"])
