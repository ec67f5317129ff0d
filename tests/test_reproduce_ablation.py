"""``reproduce ablation``: one cross-validated row per plan step, numbers read from each step's report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from breastvision.cli import main
from breastvision.errors import BreastvisionError
from breastvision.evaluation.report import evaluate_predictions
from breastvision.reproduce.ablation import PLANS_DIR, Plan
from breastvision.training.run_record import RunRecord
from test_crossval import write_config


def test_each_step_is_a_cross_validation_and_one_row(image_tree, tmp_path: Path) -> None:
    config = write_config(tmp_path / "cv.yaml", image_tree(per_class=6))
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "title": "tiny", "folds": 3, "metrics": ["accuracy", "per_class.malignant.recall"],
        "steps": [{"label": "head only", "config": str(config)},
                  {"label": "+ label smoothing", "config": str(config),
                   "set": ["train.label_smoothing=0.1"], "name": "smooth"},
                  {"label": "both", "ensemble": ["head_only", "smooth"]},
                  {"label": "chosen",
                   "select": {"candidates": ["head_only", "smooth"], "metric": "accuracy"}}],
    }))
    assert main(["reproduce", "ablation", str(plan), "--out", str(tmp_path / "abl")]) == 0
    rows = json.loads((tmp_path / "abl" / "ablation.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["head only", "+ label smoothing", "both", "chosen"]
    for row, folder in zip(rows, ["head_only", "smooth", "both", "chosen"], strict=True):
        summary = json.loads((tmp_path / "abl" / folder / "crossval.json").read_text())
        assert row["test"]["accuracy"] == pytest.approx(summary["pooled"]["intervals"]["accuracy"])
        assert row["validation"] == summary["validation"]
    for folder in ("head_only", "smooth"):
        assert all((tmp_path / "abl" / folder / f"fold{k}" / "model.safetensors").is_file() for k in range(3))
    # The ensemble row: per image, the mean of the two steps' out-of-fold probabilities.
    y, mean = [], []
    for k in range(3):
        a, b = (RunRecord.load(tmp_path / "abl" / f / f"fold{k}").predictions
                for f in ("head_only", "smooth"))
        other = dict(zip(b.keys, b.probs, strict=True))
        y.extend(a.y_true)
        mean.extend((p + other[key]) / 2 for key, p in zip(a.keys, a.probs, strict=True))
    y, mean = np.array(y), np.array(mean)
    class_names = a.class_names
    expected = evaluate_predictions(y, mean, class_names, n_resamples=0)
    assert rows[2]["test"]["accuracy"]["value"] == pytest.approx(expected["accuracy"])
    assert rows[2]["validation"]["n_images"] == rows[0]["validation"]["n_images"]
    # The selected row: chosen on validation accuracy alone (the first pick is the best single
    # candidate, later picks only when they raise it), tested as the mean of the chosen members.
    chosen = rows[3]["ensemble"]
    assert chosen and set(chosen) <= {"head_only", "smooth"}
    assert chosen == json.loads((tmp_path / "abl" / "chosen" / "selection.json").read_text())["members"]
    best_single = max(r["validation"]["accuracy"] for r in rows[:2])
    assert rows[3]["validation"]["accuracy"] >= best_single
    assert rows[chosen[0] == "smooth"]["validation"]["accuracy"] == best_single
    y, mean = [], []
    for k in range(3):
        parts = [RunRecord.load(tmp_path / "abl" / f / f"fold{k}").predictions for f in chosen]
        by_key = [dict(zip(p.keys, p.probs, strict=True)) for p in parts]
        y.extend(parts[0].y_true)
        mean.extend(np.mean([d[key] for d in by_key], axis=0) for key in parts[0].keys)
    expected = evaluate_predictions(np.array(y), np.array(mean), class_names, n_resamples=0)
    assert rows[3]["test"]["accuracy"]["value"] == pytest.approx(expected["accuracy"])
    fold0 = tmp_path / "abl" / "smooth" / "fold0"
    smoothing = yaml.safe_load((fold0 / "config.yaml").read_text())
    assert smoothing["train"]["label_smoothing"] == 0.1
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert table.count("\n| ") == 5 and "val accuracy" in table and "test per_class.malignant.recall" in table


def test_plans_are_validated_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"title": "x", "steps": [{"label": "a", "config": "c.yaml", "epochs": 3}]}))
    with pytest.raises(BreastvisionError, match="epochs"):
        Plan.read(bad)
    bad.write_text(yaml.safe_dump({"title": "x", "steps": [{"label": "a", "ensemble": ["b"]}]}))
    with pytest.raises(BreastvisionError, match="earlier steps"):
        Plan.read(bad)
    bad.write_text(yaml.safe_dump({"title": "x", "steps": [
        {"label": "a", "config": "c.yaml"}, {"label": "b", "select": {"candidates": ["a", "c"]}}]}))
    with pytest.raises(BreastvisionError, match="earlier steps"):
        Plan.read(bad)
    bad.write_text(yaml.safe_dump({"title": "x", "steps": [
        {"label": "a", "config": "c.yaml"}, {"label": "b", "context": {"of": "c"}}]}))
    with pytest.raises(BreastvisionError, match="earlier steps"):
        Plan.read(bad)
    bad.write_text(yaml.safe_dump({"title": "x", "steps": [
        {"label": "a", "config": "c.yaml", "context": {"of": "a"}}]}))
    with pytest.raises(BreastvisionError, match="patient context"):
        Plan.read(bad)
    with pytest.raises(BreastvisionError, match="not found"):
        Plan.read(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted(PLANS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_plans_name_shipped_configs(path: Path) -> None:
    from breastvision.paths import config_path
    from breastvision.training.config import load_config
    from breastvision.training.transfer import is_chain, stage_configs

    plan = Plan.read(path.name)
    names: list[str] = []
    for step in plan.steps:
        if step.config is not None and is_chain(config_path(step.config)):
            stage_configs(config_path(step.config), step.set)
        elif step.config is not None:
            load_config(config_path(step.config), step.set)
        assert set(step.ensemble) <= set(names)
        assert step.select is None or set(step.select.candidates) <= set(names)
        assert step.context is None or step.context.of in names
        names.append(step.folder)
