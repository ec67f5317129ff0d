"""The engine end to end on tiny generated images: run folder, resume, cached == uncached, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from breastvision.data.io import load_image
from breastvision.data.splits import Split
from breastvision.data.transforms import preprocess_image
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle
from breastvision.serving.predict import load_predictor
from breastvision.training.config import ExperimentConfig, apply_overrides, config_from_dict, load_config
from breastvision.training.engine import train
from breastvision.training.loop import EpochSampler

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(source: Path, out: Path, *overrides: str) -> ExperimentConfig:
    """ResNet-18 at 32×32 on a generated tree, layer4 onwards trainable, two seeded random views."""
    raw = {
        "name": "tiny",
        "output_dir": str(out),
        "data": {
            "source": str(source),
            "input_size": 32,
            "resize": 36,
            "views": {"kind": "random", "count": 2,
                      "augment": {"name": "busi_paper", "crop_scale": [0.5, 1]}},
            "split": {"protocol": "group_holdout", "options": {"fractions": [0.5, 0.25, 0.25]}},
        },
        "model": {"name": "resnet18", "first_trainable_stage": "layer4"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "cache_dir": None, "progress": "none"},
    }
    return config_from_dict(apply_overrides(raw, list(overrides)))


def history(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "history.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def predictions(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


def probabilities(run_dir: Path) -> np.ndarray:
    return np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in predictions(run_dir)])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model file's weights (its out-of-scope statistics are compared separately, if at all)."""
    return ModelBundle.load(run_dir / "model.safetensors").state_dict


def test_run_folder(image_tree, tmp_path: Path) -> None:
    record = train(tiny_config(image_tree(), tmp_path / "run"))
    run = record.run_dir
    written = ["model.safetensors", "history.csv", "split.json", "config.yaml", "report.md", "metrics.json",
               "predictions.csv", "plots/accuracy.png", "plots/confusion_matrix.png", "checkpoints/last.ckpt"]
    assert all((run / name).is_file() for name in written)
    bundle = ModelBundle.load(run / "model.safetensors")
    assert bundle.class_names == ["benign", "malignant"]
    assert (bundle.preprocessing.input_size, bundle.preprocessing.resize) == (32, 36)
    assert [e["stage"] for e in bundle.lineage] == ["initial weights", "tiny"]
    assert bundle.lineage[0]["weights"] == {"backbone": "random init"}
    assert bundle.lineage[1]["frozen_stages"] == ["stem", "layer1", "layer2", "layer3"]
    assert set(bundle.metrics) == {"val", "test"} and "accuracy" in bundle.metrics["test"]
    assert len(history(run)) == 2
    split = Split.load(run / "split.json")
    test_files = sorted(k for k, part in split.assignment.items() if part == "test")
    rows = predictions(run)
    assert [r["path"] for r in rows] == test_files
    assert json.loads((run / "metrics.json").read_text())["n_images"] == len(test_files)
    assert load_config(run / "config.yaml") == tiny_config(image_tree(), tmp_path / "run")
    assert "## Provenance" in (run / "report.md").read_text()
    # The returned record is the run folder, typed; and it is what this config would train again.
    assert record.predictions.keys == [r["path"] for r in rows] and record.facts.epochs_run == 2
    assert record.split.sha256 and record.split.protocol == "group_holdout"
    assert record.matches(tiny_config(image_tree(), tmp_path / "elsewhere", "train.threads=1"))
    assert not record.matches(tiny_config(image_tree(), tmp_path / "run", "train.lr=0.5"))
    # The model file alone reproduces the run's (calibrated) test predictions: same weights, same
    # pre-processing, softmax(logits / T) with its stored temperature.
    model = bundle.build_model()
    images = torch.stack([preprocess_image(load_image(image_tree() / r["path"]), bundle.preprocessing)
                          for r in rows])
    with torch.no_grad():
        again = torch.softmax(model(images) / bundle.temperature, 1).numpy()
    np.testing.assert_allclose(again, probabilities(run), atol=1e-5)
    _check_calibration(run, bundle, split, image_tree())
    with pytest.raises(BreastvisionError, match="holds a run already"):
        train(tiny_config(image_tree(), tmp_path / "run"))


def _check_calibration(run: Path, bundle: ModelBundle, split: Split, source: Path) -> None:
    """The model file carries a temperature and thresholds fitted on validation; the thresholds reach
    the target sensitivity on the validation images themselves; the report shows both on test."""
    from breastvision.serving.predict import TorchPredictor

    assert bundle.calibration["fitted_on"] == "validation" and bundle.temperature != 1.0
    assert bundle.calibration["nll_after"] <= bundle.calibration["nll_before"]
    points = bundle.operating_points
    assert points["positive_class"] == "malignant"
    assert set(points["thresholds"]) == {"sensitivity>=0.95", "youden"}
    val = sorted(k for k, part in split.assignment.items() if part == "val")
    images = torch.stack([preprocess_image(load_image(source / k), bundle.preprocessing) for k in val])
    score = TorchPredictor(bundle, run / "model.safetensors").probabilities(images)[:, 1]
    is_malignant = np.array([k.startswith("malignant/") for k in val])
    # A threshold is one validation image's score: float32 rounding may land that image a hair below.
    assert (score[is_malignant] >= points["thresholds"]["sensitivity>=0.95"] - 1e-6).mean() >= 0.95
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["operating_points"]["points"]) == set(points["thresholds"])
    assert metrics["calibration"]["temperature"] == bundle.temperature
    assert 0 <= metrics["calibration"]["ece_uncalibrated"] <= 1
    report = (run / "report.md").read_text()
    assert "### Operating points (malignant vs the rest)" in report and "uncalibrated →" in report


# How closely training on cached features follows training that runs the prefix every step.
# Eager features are the very same computation: bitwise equal here, so the bounds only allow for
# summation order. ONNX Runtime's features differ from eager by up to feature_cache.ONNX_TOLERANCE
# (checked on every run; 2e-6 measured here), so that run uses SGD: Adam moves a parameter whose
# gradient is near zero by about ±lr whatever the gradient's size, so any perturbation, however
# small, flips such moves, while SGD keeps a perturbation proportional to its cause. The bounds are
# ten times the differences measured with SGD (history 2e-4 relative, weights 4e-4, probabilities
# 5e-5), a hundredth of what the two epochs change (the loss falls from 0.24 to 0.13).
_CACHE_AGREEMENT = {
    "eager": {"optimizer": "adam", "history": (1e-4, 1e-5), "weights": (1e-4, 1e-5), "probabilities": 1e-5},
    "onnxruntime": {
        "optimizer": "sgd", "history": (2e-3, 1e-4), "weights": (1e-2, 4e-3), "probabilities": 5e-4,
    },
}


#: A fusion of timm's test models (EfficientNet ∥ ViT at 160 px, 0.7M parameters) cut inside both
#: branches: its prefix yields the pair (CNN map, ViT tokens), cached as two tensors per view; its
#: views are the image plus two draws of the mild ultrasound preset.
PER_BRANCH_FUSION = (
    "model.name=fusion", "model.kwargs.cnn=test_efficientnet", "model.kwargs.vit=test_vit",
    "model.first_trainable_stage=cnn.block5,vit.block6", "data.input_size=160", "data.resize=176",
    "data.views.augment=ultrasound_mild", "data.views.include_identity=true",
)
#: Per model: its overrides and the cached feature shape (one per part).
_CACHED_MODELS = {
    "resnet18": ((), [256, 2, 2]),
    "per_branch_fusion": (PER_BRANCH_FUSION, [[48, 10, 10], [101, 64]]),
}


@pytest.mark.parametrize("model", list(_CACHED_MODELS))
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_cached_and_uncached_training_agree(
    image_tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, model: str
) -> None:
    """Same seed, same batches, same dropout: training on cached prefix outputs is training, for
    one cached tensor per view and for a fusion's pair of branch outputs alike."""
    from breastvision.training import feature_cache

    monkeypatch.setattr(feature_cache, "ONNX_MIN_VIEWS", 0)  # 24 views: ORT even so
    source = image_tree()
    tolerance = _CACHE_AGREEMENT[backend]
    model_overrides, shape = _CACHED_MODELS[model]
    common = [f"train.optimizer={tolerance['optimizer']}", f"train.cache_backend={backend}", *model_overrides]
    cache = f"train.cache_dir={tmp_path / 'features'}"
    cached = train(tiny_config(source, tmp_path / "cached", "train.cache_features=true", cache, *common)
                   ).run_dir
    uncached = train(tiny_config(source, tmp_path / "uncached", "train.cache_features=false", *common)
                   ).run_dir
    again = train(tiny_config(source, tmp_path / "again", "train.cache_features=true", cache, *common)
                   ).run_dir
    first = json.loads((cached / "provenance.json").read_text())["facts"]["feature_cache"]
    assert first["backend"] == backend and first["backend_note"] is None
    assert first["feature_shape"] == shape
    if backend == "onnxruntime":
        assert first["onnx_max_abs_diff"] <= 1e-4
    for a, b in zip(history(cached), history(uncached), strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            rel, abs_ = tolerance["history"]
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), key
    w_uncached = weights(uncached)
    for key, value in weights(cached).items():
        rtol, atol = tolerance["weights"]
        torch.testing.assert_close(value, w_uncached[key], rtol=rtol, atol=atol, msg=key)
    np.testing.assert_allclose(
        probabilities(cached), probabilities(uncached), atol=tolerance["probabilities"]
    )
    facts = json.loads((again / "provenance.json").read_text())["facts"]["feature_cache"]
    assert facts["used"] and facts["entries_computed"] == 0 and facts["entries_reused"] > 0
    assert facts["backend"] is None  # nothing computed
    for a, b in zip(history(again), history(cached), strict=True):
        assert a["train_loss"] == b["train_loss"]


@pytest.mark.parametrize("stage", ["cnn.block5,vit.patch_embed", "cnn.stem,vit.block6", "vit"])
def test_a_prefix_that_hands_on_the_image_is_not_cached(image_tree, tmp_path: Path, stage: str) -> None:
    """A fusion branch trained whole gets the image itself from the prefix: caching it saves nothing."""
    overrides = [*PER_BRANCH_FUSION, f"model.first_trainable_stage={stage}", "train.epochs=1"]
    with pytest.raises(BreastvisionError, match="hands on the image itself"):
        train(tiny_config(image_tree(), tmp_path / "forced", "train.cache_features=true", *overrides))
    run = train(tiny_config(image_tree(), tmp_path / "auto", *overrides)).run_dir
    assert json.loads((run / "provenance.json").read_text())["facts"]["feature_cache"] == {"used": False}


class _Views(torch.utils.data.Dataset):
    """(image, label, index) items, as the engine's view datasets yield them."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.images[i], 0, i


def test_feature_cache_backend_is_checked_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ONNX Runtime computes the features within ONNX_TOLERANCE of eager; an export failure or a
    difference beyond the tolerance makes the run compute eagerly, and says why."""
    from lightning.fabric import Fabric

    from breastvision.training import feature_cache

    torch.manual_seed(0)
    prefix = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2)
    ).eval()
    images = torch.rand(10, 3, 20, 20)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    paths = [tmp_path / f"{i}.png" for i in range(10)]

    def compute(**kwargs: Any) -> tuple[torch.Tensor, feature_cache.FeatureCache]:
        cache = feature_cache.FeatureCache(prefix, None, {}, **{"onnx_min_views": 0, **kwargs})
        return cache.features(_Views(images), paths, ["identity"] * 10, fabric, batch_size=4), cache

    eager, cache = compute(backend="eager")
    assert cache.backend == "eager" and cache.max_abs_diff is None
    with torch.no_grad():
        assert torch.equal(eager, prefix(images))
    few, cache = compute(onnx_min_views=11)
    assert cache.backend == "eager" and "10 views to compute: too few" in cache.backend_note
    assert torch.equal(few, eager)
    onnx, cache = compute()
    assert cache.backend == "onnxruntime" and cache.backend_note is None
    assert cache.max_abs_diff is not None and cache.max_abs_diff <= feature_cache.ONNX_TOLERANCE
    assert (onnx - eager).abs().max() <= feature_cache.ONNX_TOLERANCE

    monkeypatch.setattr(feature_cache, "ONNX_TOLERANCE", 0.0)
    strict, cache = compute()
    assert cache.backend == "eager" and "differed from eager" in cache.backend_note
    assert torch.equal(strict, eager)

    def broken(*_: Any) -> None:
        raise RuntimeError("exporter says no")

    monkeypatch.setattr(feature_cache, "OnnxPrefix", broken)
    fallback, cache = compute()
    assert cache.backend == "eager" and "exporter says no" in cache.backend_note
    assert torch.equal(fallback, eager)


@pytest.mark.parametrize(
    "balance",
    [[], ["train.sampler=balanced", "train.class_weighting=balanced", "train.monitor=val_recall_macro"],
     ["train.mixup_alpha=0.4"]],
    ids=["shuffle", "balanced", "mixup"],
)
def test_resume_continues_exactly(image_tree, tmp_path: Path, balance: list[str]) -> None:
    source = image_tree()
    # 8 benign : 4 malignant images, so the weights and the sampler have something to balance
    if "train.sampler=balanced" in balance:
        source = Path(shutil.copytree(source, tmp_path / "images"))
        for path in sorted((source / "malignant").iterdir())[:4]:
            path.unlink()
    straight = train(tiny_config(source, tmp_path / "straight", "train.epochs=3", *balance)).run_dir
    first = train(tiny_config(source, tmp_path / "split", "train.epochs=1", *balance)).run_dir
    resumed = train(tiny_config(source, tmp_path / "split", "train.epochs=3", *balance),
                    resume=first / "checkpoints" / "last.ckpt").run_dir
    assert resumed == first
    h_straight, h_resumed = history(straight), history(resumed)
    assert [r["epoch"] for r in h_resumed] == [1, 2, 3]
    for a, b in zip(h_straight, h_resumed, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["lr"] == b["lr"]
    w_resumed = weights(resumed)
    assert all(torch.allclose(v, w_resumed[k], atol=1e-6) for k, v in weights(straight).items())
    facts = json.loads((resumed / "provenance.json").read_text())["facts"]
    balanced = "train.sampler=balanced" in balance
    assert facts["class_balance"]["sampler"] == ("balanced" if balanced else "shuffle")
    if balanced:
        counts = facts["class_balance"]["training_items_per_class"]
        weighted = facts["class_balance"]["class_weights"]
        assert counts["benign"] > counts["malignant"] and weighted["malignant"] > 1 > weighted["benign"]
        best = max(h_resumed, key=lambda r: (r["val_recall_macro"], -r["val_loss"]))  # the monitor chose it
        assert facts["best_epoch"] == best["epoch"]
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert all("recall" in metrics["per_class"][c] for c in ("benign", "malignant"))
    with pytest.raises(BreastvisionError, match="different model settings"):
        train(tiny_config(source, tmp_path / "other", "model.first_trainable_stage=layer3"),
              resume=first / "checkpoints" / "last.ckpt")
    # The run's own best.ckpt (weights only) is named for what it is, not blamed on the settings.
    with pytest.raises(BreastvisionError, match=r"best-epoch checkpoint .* resume from .*last\.ckpt"):
        train(tiny_config(source, tmp_path / "split", "train.epochs=4"),
              resume=first / "checkpoints" / "best.ckpt")


def test_epoch_sampler_shards() -> None:
    shards = [list(EpochSampler(7, rank, 2, seed=0, shuffle=False, pad=False)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # evaluation: every item exactly once
    padded = [list(EpochSampler(7, rank, 2, seed=0, shuffle=True, pad=True)) for rank in range(2)]
    assert len(padded[0]) == len(padded[1]) == 4  # training: equal steps on every process
    assert set(padded[0] + padded[1]) == set(range(7))


def test_run_predictions_are_what_predict_and_evaluate_give(image_tree, tmp_path: Path) -> None:
    """The engine's test pass is the one predictor's: its predictions.csv (trained on cached features,
    calibrated, with operating points and a scope) equals ``breastvision predict`` and ``evaluate`` on
    the same files with the same model file, in one table format."""
    from breastvision.cli import main

    source = image_tree()
    run = train(tiny_config(source, tmp_path / "run", "train.cache_dir=" + str(tmp_path / "cache"))).run_dir
    assert json.loads((run / "provenance.json").read_text())["facts"]["feature_cache"]["used"]
    model = run / "model.safetensors"
    bundle = ModelBundle.load(model)
    assert bundle.operating_points and bundle.scope is not None and bundle.temperature != 1.0
    engine = predictions(run)
    assert main(["predict", str(model), *(str(source / r["path"]) for r in engine), "--out",
                 str(tmp_path / "predict.csv")]) == 0
    assert main(["evaluate", str(model), str(source), "--split", str(run / "split.json"), "--out",
                 str(tmp_path / "evaluate"), "--n-resamples", "0"]) == 0
    predicted = list(csv.DictReader((tmp_path / "predict.csv").open()))
    evaluated = list(csv.DictReader((tmp_path / "evaluate" / "predictions.csv").open()))
    assert list(evaluated[0]) == list(engine[0])  # one format: predict's, plus the truth, group, subtype
    assert list(predicted[0]) == [k for k in engine[0] if k not in ("true_label", "group", "subtype")]
    assert [r["path"] for r in evaluated] == [r["path"] for r in engine]
    numbers = [k for k in engine[0] if k.startswith("p_") or k == "scope_score"]
    for other in (predicted, evaluated):
        np.testing.assert_allclose([[float(r[k]) for k in numbers] for r in other],
                                   [[float(r[k]) for k in numbers] for r in engine], atol=1e-5)
        calls = [k for k in engine[0] if k.startswith("malignant_at_") or k in ("decision", "out_of_scope")]
        assert [[r[k] for k in calls] for r in other] == [[r[k] for k in calls] for r in engine]


def test_two_processes_count_every_test_image_once(image_tree, tmp_path: Path) -> None:
    """2 CPU processes (gloo) through Fabric's DDP launcher, with an odd number of test images and
    8-view test-time augmentation: every image is predicted once, by the predictor's TTA."""
    source = image_tree(per_class=9, seed=1)
    config = tiny_config(source, tmp_path / "ddp", "train.epochs=1", "data.tta=dihedral8",
                         "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp",
                         "data.split.options.fractions=[0.5, 0.25, 0.25]")
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(config.to_dict()))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "breastvision", "train", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "ddp"
    # The command ends with the test metrics, printed once although two processes ran it.
    assert done.stdout.count(f"report: {run / 'report.md'}") == 1
    assert "accuracy: " in done.stdout
    split = Split.load(run / "split.json")
    test_files = sorted(k for k, part in split.assignment.items() if part == "test")
    assert len(test_files) % 2 == 1  # a DistributedSampler would pad with a duplicate here
    rows = predictions(run)
    assert sorted(r["path"] for r in rows) == test_files
    facts = json.loads((run / "provenance.json").read_text())["facts"]
    assert facts["processes"] == 2 and facts["views"]["test"] == len(test_files)
    assert json.loads((run / "metrics.json").read_text())["n_images"] == len(test_files)
    predictor = load_predictor(run / "model.safetensors")
    images = torch.stack([predictor.prepare_file(source / r["path"]) for r in rows])
    np.testing.assert_allclose(probabilities(run), predictor.probabilities(images, tta=True), atol=1e-5)


def _busi_sample(busi_dir: Path, tree: Path) -> Path:
    """4 real BUSI images per class (masks beside them), linked into ``tree``."""
    for name in ("benign", "malignant", "normal"):
        (tree / name).mkdir(parents=True)
        images = sorted(p for p in (busi_dir / name).glob("*.png") if "_mask" not in p.name)[:4]
        for image in images:
            for source in (image, *image.parent.glob(f"{image.stem}_mask*.png")):
                (tree / name / source.name).symlink_to(source)
    return tree


@pytest.mark.slow
def test_shipped_busi_cpu_config_on_real_files(busi_dir: Path, weights_dir: Path, tmp_path: Path) -> None:
    """configs/busi_fusion_cpu.yaml (DenseNet-121 ∥ ViT-Tiny, both frozen and cached) on 4 real
    BUSI images per class, read by the BUSI reader (masks beside them), one epoch."""
    tree = _busi_sample(busi_dir, tmp_path / "busi")
    config = load_config(CONFIGS / "busi_fusion_cpu.yaml", [
        f"data.source={tree}", "data.split.options.k=4", "data.views.count=1", f"weights_root={weights_dir}",
        "train.epochs=1", "train.cache_dir=null", "train.progress=none", f"output_dir={tmp_path / 'run'}",
    ])
    run = train(config).run_dir
    bundle = ModelBundle.load(run / "model.safetensors")
    assert sorted(bundle.class_names) == ["benign", "malignant", "normal"]
    assert bundle.architecture == "fusion" and bundle.model_kwargs["vit"] == "vit_tiny"
    origin = bundle.extra["weights_origin"]
    assert "densenet121_imagenet_keras" in origin["cnn"] and "vit_tiny_patch16" in origin["vit"]
    facts = json.loads((run / "provenance.json").read_text())["facts"]
    assert facts["feature_cache"]["feature_shape"] == [1024 + 192]  # pooled DenseNet ∥ ViT-Tiny
    assert facts["trainable_parameters"] < 1_000_000  # the fusion head only
    assert len(predictions(run)) == json.loads((run / "metrics.json").read_text())["n_images"]


@pytest.mark.slow
def test_shipped_partial_fusion_config_on_real_files(
    busi_dir: Path, weights_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/busi_fusion_partial_cpu.yaml: each branch's frozen prefix cached as the pair
    (transition3's map, block10's tokens) by ONNX Runtime, whose check passes on the real weights
    (ViT-Tiny's tokens reach hundreds: the check is relative to their scale), one epoch."""
    from breastvision.training import feature_cache

    monkeypatch.setattr(feature_cache, "ONNX_MIN_VIEWS", 0)
    tree = _busi_sample(busi_dir, tmp_path / "busi")
    config = load_config(CONFIGS / "busi_fusion_partial_cpu.yaml", [
        f"data.source={tree}", "data.split.options.k=4", f"weights_root={weights_dir}", "train.epochs=1",
        "train.batch_size=4", "train.cache_dir=null", "train.progress=none", f"output_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    run = train(config).run_dir
    facts = json.loads((run / "provenance.json").read_text())["facts"]
    cache = facts["feature_cache"]
    assert cache["used"] and cache["backend"] == "onnxruntime", cache["backend_note"]
    assert cache["feature_shape"] == [[512, 7, 7], [197, 192]]
    lineage = ModelBundle.load(run / "model.safetensors").lineage[-1]
    assert lineage["frozen_stages"][-2:] == ["vit.block9", "vit.block10"]
    assert facts["trainable_parameters"] > 2_000_000  # denseblock4 and two ViT blocks besides the head
