"""``breastvision reproduce busi`` with a tiny preset on generated images: one table, every setting."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from breastvision.errors import BreastvisionError
from breastvision.reproduce import busi
from breastvision.training.config import load_config


def tiny_rows(tmp_path: Path, pretrained: str | None = None) -> tuple[busi.Row, ...]:
    """Two rows (ResNet-18 at 32 px, head only / all layers): seconds per run."""
    base = {
        "name": "tiny_cached",
        "data": {"input_size": 32, "resize": 36, "views": {"kind": "random", "count": 2}},
        "model": {"name": "resnet18", "first_trainable_stage": "head", "pretrained": pretrained},
        "train": {"epochs": 1, "batch_size": 16, "cache_dir": None, "progress": "none"},
    }
    cached = tmp_path / "cached.yaml"
    cached.write_text(yaml.safe_dump(base))
    whole = tmp_path / "whole.yaml"
    whole.write_text(yaml.safe_dump({"extends": "cached.yaml", "name": "tiny_whole",
                                     "model": {"first_trainable_stage": None}}))
    return (busi.Row("cached", str(cached)),
            busi.Row("whole", str(whole), ("group_holdout",), {"group_holdout": ("train.epochs=2",)}))


def test_table_has_every_run_beside_the_paper(image_tree, tmp_path: Path, monkeypatch) -> None:
    source = image_tree(classes=("benign", "malignant", "normal"), per_class=10)
    monkeypatch.setitem(busi.PRESETS, "tiny", tiny_rows(tmp_path))
    monkeypatch.setitem(busi.PRESET_NOTES, "tiny", "Preset `tiny`: a test.")
    parser = argparse.ArgumentParser()
    busi.add_arguments(parser)
    parser.set_defaults(preset="tiny")
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--set", f"data.source={source}"])
    assert busi.run(args) == 0

    out = tmp_path / "out"
    table = (out / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    runs = [line for line in lines if "| this run |" in line]
    assert len(runs) == len(busi.SETTINGS) + 1 and len([x for x in lines if "| paper |" in x]) == 3
    for setting, text in busi.SETTINGS.items():
        assert sum(text in line for line in runs) == (2 if setting == "group_holdout" else 1)
    assert "0.932" in table and "0.874" in table and "Preset `tiny`" in table
    # "What was run" comes from each run's config: the override reached the run.
    assert "epochs: 2" in next(line for line in runs if "| whole |" in line)
    assert "frozen before 'head'" in runs[0]

    record = json.loads((out / "table.json").read_text())["runs"]
    for entry in record:
        metrics = json.loads((Path(entry["run_dir"]) / "metrics.json").read_text())
        assert entry["metrics"]["accuracy"]["value"] == pytest.approx(metrics["accuracy"])
        assert f"{metrics['accuracy']:.3f}" in table
        split = json.loads((Path(entry["run_dir"]) / "split.json").read_text())
        assert split["protocol"] == entry["setting"]
    # Every row of a setting was tested on the same split.
    holdout = [e for e in record if e["setting"] == "group_holdout"]
    assert len({(Path(e["run_dir"]) / "split.json").read_text() for e in holdout}) == 1
    after_aug = next(e for e in record if e["setting"] == "u_random_82_after_aug")
    # The paper's protocol tests augmented views: all 5 × 30 of them that are not train or val.
    views = after_aug["facts"]["views"]
    assert after_aug["test_items"] == 30 * 5 - views["train"] - views["val"]

    # A second invocation reuses every finished run.
    mtimes = {e["run_dir"]: (Path(e["run_dir"]) / "model.safetensors").stat().st_mtime_ns for e in record}
    busi.run(args)
    assert mtimes == {e["run_dir"]: (Path(e["run_dir"]) / "model.safetensors").stat().st_mtime_ns
                      for e in record}


def test_missing_weights_stop_before_any_training(image_tree, tmp_path: Path) -> None:
    rows = tiny_rows(tmp_path, pretrained="no_such_weights.safetensors")
    with pytest.raises(BreastvisionError, match="no_such_weights"):
        busi.reproduce(rows, tmp_path / "out", [f"data.source={image_tree()}"])
    assert not (tmp_path / "out").exists()


def test_shipped_presets_load() -> None:
    """Every shipped row config is valid and the CPU rows say what they are."""
    for preset, rows in busi.PRESETS.items():
        for row in rows:
            for setting in row.settings:
                config = busi._load(row, setting, [])
                assert config.data.split.protocol == setting and config.data.source == "busi"
                if preset == "paper":
                    assert config.train.epochs == 30 and config.data.input_size == 224
    cpu = {row.label: busi._load(row, row.settings[0], []) for row in busi.PRESETS["cpu"]}
    assert cpu["ResNet18"].model.pretrained is None and cpu["GoogLeNet"].model.name == "googlenet"
    assert load_config(busi.CONFIGS / "busi_resnet18_paper.yaml").model.pretrained == "imagenet"
