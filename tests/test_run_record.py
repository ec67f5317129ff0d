"""The run record: the one 'same run?' rule, and a run folder read back into typed fields."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from breastvision.errors import BreastvisionError
from breastvision.training.checkpoint import check_resumable
from breastvision.training.config import config_from_dict
from breastvision.training.run_record import Predictions, RunFacts, RunRecord, config_differences


def _config(**sections):
    return config_from_dict({"name": "r", "data": {"source": "busi", **sections.get("data", {})},
                             "train": {"epochs": 2, **sections.get("train", {})}})


def test_speed_and_location_settings_do_not_make_another_run() -> None:
    saved = _config().to_dict()
    faster = _config(train={"threads": 3, "progress": "none"}, data={"num_workers": 2})
    assert config_differences(saved, faster) == []
    assert config_differences({**saved, "output_dir": "elsewhere", "weights_root": "/w"}, _config()) == []
    assert config_differences({**saved, "name": "renamed"}, _config()) == []
    # A view list means something for dihedral views only.
    drawn = _config(data={"views": {"kind": "random", "count": 2}})
    listed = _config(data={"views": {"kind": "random", "count": 2, "names": ["identity", "hflip"]}})
    assert config_differences(drawn.to_dict(), listed) == []
    dihedral = _config(data={"views": {"kind": "dihedral", "names": ["identity", "hflip"]}})
    assert config_differences(_config(data={"views": {"kind": "dihedral"}}).to_dict(), dihedral) == [
        "data.views.names: ['rot90', 'rot180', 'rot270', 'hflip', 'vflip'] → ['identity', 'hflip']"]
    elsewhere = _config(train={"cache_dir": "/other/cache"}, data={"stain": {"cache_dir": "/other/stain"}})
    assert config_differences(_config(data={"stain": {}}).to_dict(), elsewhere) == []
    assert config_differences(saved, _config(data={"fold": 1})) == ["data.fold: None → 1"]
    # Resuming may change training settings (more epochs), never the data or the model.
    assert config_differences(saved, _config(train={"epochs": 5}), may_differ=("train",)) == []
    last = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "history": [], "best": None,
            "config": saved}
    check_resumable(last, _config(train={"epochs": 5}), "last.ckpt")
    with pytest.raises(BreastvisionError, match=r"different data settings \(data.fold: None → 1\)"):
        check_resumable(last, _config(data={"fold": 1}), "last.ckpt")


def test_a_key_newer_than_the_saved_run_stands_for_its_default() -> None:
    saved = _config().to_dict()
    for key in ("class_weighting", "sampler", "mask_loss_weight"):
        del saved["train"][key]  # a run folder of a version before these settings
    assert config_differences(saved, _config()) == []
    assert config_differences(saved, _config(train={"class_weighting": "balanced"})) == [
        "train.class_weighting: 'none' → 'balanced'"
    ]


def _run_folder(tmp: Path) -> Path:
    Predictions(["a.png", "b.png"], ["g1", "g2"], np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]]),
                ["benign", "malignant"]).save(tmp / "predictions.csv")
    facts = {"best_epoch": 2, "epochs_run": 3, "parameters": 10, "a fact of a later version": 1}
    (tmp / "provenance.json").write_text(json.dumps({"facts": facts, "lineage": [{"stage": "x"}],
                                                     "weights_origin": {"backbone": "random init"}}))
    (tmp / "metrics.json").write_text(json.dumps({"accuracy": 1.0}))
    return tmp


def test_a_run_folder_reads_back_typed(tmp_path: Path) -> None:
    record = RunRecord.load(_run_folder(tmp_path))
    assert record.predictions.keys == ["a.png", "b.png"]
    assert record.predictions.class_names == ["benign", "malignant"]
    np.testing.assert_allclose(record.predictions.probs, [[0.8, 0.2], [0.3, 0.7]])
    assert record.facts == RunFacts(parameters=10, epochs_run=3, best_epoch=2)  # unknown facts dropped
    assert record.facts.to_dict() == {"parameters": 10, "epochs_run": 3, "best_epoch": 2}
    assert record.metrics == {"accuracy": 1.0} and record.lineage == [{"stage": "x"}]
    assert record.split is None and record.config is None and not RunRecord.is_finished(tmp_path)
    # Without its config a folder cannot be reused for anything.
    with pytest.raises(BreastvisionError, match="no config.yaml"):
        record.matches(_config())


def test_a_folder_without_predictions_is_not_a_finished_run(tmp_path: Path) -> None:
    with pytest.raises(BreastvisionError, match="no predictions.csv"):
        RunRecord.load(tmp_path)


def test_check_matches_names_what_differs(tmp_path: Path) -> None:
    record = RunRecord.load(_run_folder(tmp_path))
    record.config = _config().to_dict()
    record.check_matches(_config(train={"threads": 1}))
    with pytest.raises(BreastvisionError, match=r"different configuration \(train.lr: 0.001 → 0.5\)"):
        record.check_matches(_config(train={"lr": 0.5}))
