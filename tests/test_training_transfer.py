"""Multi-level transfer: stages chain through model files, freeze what the config says, and record
their lineage; finished stages are reused. Generated images, then the real shared data."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle
from breastvision.training.transfer import run_chain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["train.epochs=1", "train.batch_size=4", "train.cache_dir=null", "train.progress=none"]


def _chain(tmp_path: Path, lung: Path, breast: Path) -> Path:
    (tmp_path / "lung.yaml").write_text(
        f"data: {{source: {lung}, input_size: 32, split: {{protocol: group_holdout, "
        "options: {fractions: [0.5, 0.25, 0.25]}}}\n"
        "model: {name: resnet18, first_trainable_stage: layer3}\n"
    )
    (tmp_path / "breast.yaml").write_text(
        f"extends: lung.yaml\ndata: {{source: {breast}, views: {{kind: dihedral, names: [rot90, hflip]}}}}\n"
        "model: {first_trainable_stage: layer4}\n"
    )
    chain = tmp_path / "chain.yaml"
    chain.write_text("name: chain\nstages:\n  - {name: lung, config: lung.yaml}\n"
                     "  - {name: breast, config: breast.yaml}\n")
    return chain


def test_two_stage_chain(image_tree, tmp_path: Path) -> None:
    lung = image_tree(classes=("aca", "n", "scc"), per_class=6, seed=2)
    chain = _chain(tmp_path, lung, image_tree())
    first, second = (r.run_dir for r in run_chain(chain, TINY, out=tmp_path / "runs"))
    parent = ModelBundle.load(first / "model.safetensors")
    child = ModelBundle.load(second / "model.safetensors")
    assert (len(parent.class_names), len(child.class_names)) == (3, 2)  # new classifier for stage 2
    assert [e["stage"] for e in child.lineage] == ["initial weights", "lung", "breast"]
    assert child.lineage[:2] == parent.lineage
    assert str(first / "model.safetensors") in child.lineage[2]["weights"]["backbone"]
    assert str(first / "model.safetensors") in child.extra["weights_origin"]["backbone"]
    # Stage 2 froze stem..layer3, so those are exactly stage 1's weights; layer4 moved on.
    w1, w2 = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    for key, value in w2.items():
        if key.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
            assert torch.equal(value, w1[key]), key
    assert not all(torch.equal(w2[k], w1[k]) for k in w2 if k.startswith("layer4"))
    assert "| 3 | breast |" in (second / "report.md").read_text()  # the report prints the chain

    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert [r.run_dir for r in run_chain(chain, TINY, out=tmp_path / "runs")] == [first, second]  # reused
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(BreastvisionError, match="trained with another config"):
        run_chain(chain, [*TINY, "lung.train.lr=0.5"], out=tmp_path / "runs")


def test_a_chain_is_cross_validated_on_its_last_stage(image_tree, tmp_path: Path) -> None:
    from breastvision.cli import main
    from breastvision.training.run_record import RunRecord

    lung = image_tree(classes=("aca", "n", "scc"), per_class=6, seed=2)
    chain = _chain(tmp_path, lung, image_tree(per_class=6))
    kfold = ["breast.data.split.protocol=group_kfold", "breast.data.split.options={}"]
    out = tmp_path / "cv"
    assert main(["crossval", str(chain), "--folds", "3", "--out", str(out),
                 *(f"--set={item}" for item in [*TINY, *kfold])]) == 0
    # The lung stage does not depend on the fold: trained once, the start of every fold's breast stage.
    lung_model = out / "lung" / "model.safetensors"
    stage_dirs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots")
    assert stage_dirs == ["breast_fold0", "breast_fold1", "breast_fold2", "lung"]
    folds = [RunRecord.load(out / f"breast_fold{k}") for k in range(3)]
    for record in folds:
        bundle = ModelBundle.load(record.model_file)
        assert str(lung_model) in bundle.lineage[2]["weights"]["backbone"]
    tested = sorted(k for r in folds for k in r.predictions.keys)
    assert len(tested) == len(set(tested)) == 12  # every breast image tested once, out of fold
    summary = json.loads((out / "crossval.json").read_text())
    assert summary["pooled"]["n_images"] == 12
    assert [row["run_dir"] for row in summary["per_fold"]] == [str(r.run_dir) for r in folds]


def _subset_manifest(source: Path, target: Path, per_group: int, groups_per_class: int, group: str) -> Path:
    """A manifest listing a few groups per class of a real data set, through a link to its folder
    (manifest rows must lie inside the manifest's folder)."""
    with source.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_class: dict[str, dict[str, list[dict]]] = {}
    for row in rows:
        by_class.setdefault(row["label"], {}).setdefault(row[group], []).append(row)
    chosen = []
    for groups in by_class.values():
        for name in random.Random(0).sample(sorted(groups), groups_per_class):
            chosen += groups[name][:per_group]
    link = target.with_suffix("")
    link.symlink_to(source.parent, target_is_directory=True)
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "path": f"{link.name}/{r['path']}"} for r in chosen)
    return target


@pytest.mark.slow
def test_three_stage_run_on_real_images(lc25000_dir: Path, breakhis_dir: Path, weights_dir: Path,
                                        tmp_path: Path) -> None:
    """ImageNet DenseNet-121 weights → LC25000 → BreakHis (Macenko, dihedral views, patient-disjoint
    folds) with the shipped CPU chain config, shrunk to a few images at 64×64."""
    lung = _subset_manifest(lc25000_dir.parent / "manifest.csv", tmp_path / "lung.csv", 2, 5, "tile_group")
    breast = _subset_manifest(breakhis_dir / "manifest.csv", tmp_path / "breast.csv", 2, 5, "patient_id")
    overrides = [*TINY, f"weights_root={weights_dir}", "data.input_size=64", f"lc25000.data.source={lung}",
                 f"breakhis.data.source={breast}", f"breakhis.data.stain.cache_dir={tmp_path / 'stain'}",
                 "lc25000.data.split.options.fractions=[0.6, 0.2, 0.2]"]
    lc, bh = (r.run_dir for r in run_chain(CONFIGS / "breakhis_multilevel_cpu.yaml", overrides,
                                            out=tmp_path / "runs"))
    bundle = ModelBundle.load(bh / "model.safetensors")
    assert [e["stage"] for e in bundle.lineage] == ["initial weights", "lc25000", "breakhis"]
    assert "densenet121_imagenet_keras.safetensors" in str(bundle.lineage[0]["weights"])
    assert bundle.lineage[1]["frozen_stages"][-1] == "transition2"  # deep blocks learn LC25000
    assert bundle.lineage[2]["trainable_stages"] == ["head"]  # "mainly by freezing", CPU-sized
    assert bundle.class_names == ["benign", "malignant"] and bundle.architecture == "densenet121_se"
    assert bundle.preprocessing.stain is not None and bundle.preprocessing.stain["method"] == "macenko"
    report = (bh / "report.md").read_text()
    assert "P_arp" in report and "lc25000" in report
    assert lc == tmp_path / "runs" / "lc25000" and bh == tmp_path / "runs" / "breakhis_fold0"
