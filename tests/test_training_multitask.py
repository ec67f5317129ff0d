"""Mask-guided training end to end on generated BUSI-like data (images with ``_mask`` files): the
mask head trains, ``w = 0`` trains what a model without a head trains, cached == uncached with
masks, the Dice reaches metrics.json, the report and cross-validation, and prediction and export
need no mask."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.fabric import Fabric
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from breastvision.cli import main
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model
from breastvision.serving.export import export_onnx
from breastvision.training.config import ExperimentConfig, ViewConfig, apply_overrides, config_from_dict
from breastvision.training.engine import train
from breastvision.training.freezing import freeze_before
from breastvision.training.loop import train_one_epoch
from breastvision.training.segmentation import MaskedDataset, render_masks
from breastvision.training.views import Item, ViewDataset, ViewRenderer

SPLIT = "cnn.layer4,vit.head"  # the CNN's last block trains (the head reads its map), the ViT is frozen


@pytest.fixture(scope="module")
def busi_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BUSI's layout: bright square lesions with their ``NAME_mask.png`` (one image with two masks,
    ``_mask_1``), normal images without a mask or with BUSI's black one."""
    root = tmp_path_factory.mktemp("busi_like")
    rng = np.random.default_rng(0)
    side = 64
    for label, name in enumerate(("benign", "malignant", "normal")):
        (root / name).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 90, (side, side, 3), dtype=np.uint8)
            stem = f"{name} ({i + 1})"
            for k in range(0 if name == "normal" else 1 + (i == 0)):
                width = int(rng.integers(14, 26))
                x, y = rng.integers(0, side - width, 2)
                mask = np.zeros((side, side), np.uint8)
                mask[y : y + width, x : x + width] = 255
                pixels[mask > 0] = 180 + 35 * label
                Image.fromarray(mask).save(root / name / f"{stem}_mask{'' if k == 0 else f'_{k}'}.png")
            if name == "normal" and i % 2:
                Image.fromarray(np.zeros((side, side), np.uint8)).save(root / name / f"{stem}_mask.png")
            Image.fromarray(pixels).save(root / name / f"{stem}.png")
    return root


def config(source: Path, out: Path, *overrides: str) -> ExperimentConfig:
    raw = {
        "name": "multitask",
        "output_dir": str(out),
        "data": {"source": str(source), "views": {"kind": "identity"},
                 "split": {"protocol": "group_holdout", "options": {"fractions": [0.5, 0.25, 0.25]}}},
        "model": {"name": "fusion", "kwargs": {"cnn": "resnet18", "vit": "vit_tiny", "seg_head": True},
                  "first_trainable_stage": SPLIT},
        "train": {"epochs": 2, "batch_size": 3, "lr": 1e-3, "cache_dir": None, "progress": "none",
                  "cache_features": False},
    }
    return config_from_dict(apply_overrides(raw, list(overrides)))


def history(run: Path) -> list[dict[str, float]]:
    with (run / "history.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return ModelBundle.load(run / "model.safetensors").state_dict


@pytest.fixture(scope="module")
def runs(busi_like: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    settings = {"masked": ["train.mask_loss_weight=1", "train.epochs=4"], "zero": [],
                "no_head": ["model.kwargs.seg_head=false"]}
    runs = {name: train(config(busi_like, out / name, *extra)).run_dir for name, extra in settings.items()}
    for run in runs.values():  # no test resumes: the checkpoints would be 600 MB kept all session
        shutil.rmtree(run / "checkpoints")
    return runs


def test_mask_loss_trains_the_head_and_its_loss_falls(runs: dict[str, Path]) -> None:
    rows = history(runs["masked"])
    assert rows[-1]["train_mask_loss"] < rows[0]["train_mask_loss"]
    assert all(r["train_loss"] > r["train_mask_loss"] for r in rows)  # CE + 1 · mask loss
    trained, untouched = weights(runs["masked"]), weights(runs["zero"])  # "zero": the initial head
    for key in ("seg_head.conv.weight", "seg_head.conv.bias"):
        assert not torch.equal(trained[key], untouched[key]), key
    metrics = json.loads((runs["masked"] / "metrics.json").read_text())
    dice = metrics["segmentation"]
    facts = json.loads((runs["masked"] / "provenance.json").read_text())["facts"]
    assert dice["images"] == facts["views"]["test"] and 0 < dice["lesion_images"] < dice["images"]
    assert 0.0 <= dice["dice"] <= 1.0
    assert "lesion-mask head" in (runs["masked"] / "report.md").read_text()


def test_zero_weight_trains_exactly_what_a_model_without_the_head_trains(runs: dict[str, Path]) -> None:
    zero, plain = history(runs["zero"]), history(runs["no_head"])
    assert "train_mask_loss" not in zero[0]
    for a, b in zip(zero, plain, strict=True):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
    with_head, without = weights(runs["zero"]), weights(runs["no_head"])
    assert set(with_head) - set(without) == {"seg_head.conv.weight", "seg_head.conv.bias"}
    assert all(torch.equal(without[k], with_head[k]) for k in without)
    torch.manual_seed(0)  # the engine's seed: the frozen head is still its initial draw
    initial = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny", seg_head=True)
    assert torch.equal(with_head["seg_head.conv.weight"], initial.seg_head.conv.weight)
    assert "segmentation" not in json.loads((runs["zero"] / "metrics.json").read_text())


def test_prediction_and_export_need_no_mask(runs: dict[str, Path], busi_like: Path, tmp_path: Path) -> None:
    model_file = runs["masked"] / "model.safetensors"
    assert ModelBundle.load(model_file).build_model().seg_head is not None
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(model_file), str(busi_like / "benign"), "--out", str(out)]) == 0
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and not any(r["skipped"] for r in rows)  # the mask files are not inputs
    result = export_onnx(model_file, tmp_path / "model.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4


def test_cross_validation_pools_the_dice(runs: dict[str, Path], tmp_path: Path) -> None:
    from breastvision.training.crossval import aggregate_runs

    # Two copies of one run stand for two folds: their test images must differ, so rename them.
    folds = []
    for k in range(2):
        fold = tmp_path / f"fold{k}"
        fold.mkdir()
        for name in ("metrics.json", "provenance.json", "config.yaml", "split.json"):
            (fold / name).write_bytes((runs["masked"] / name).read_bytes())
        text = (runs["masked"] / "predictions.csv").read_text().splitlines()
        rows = [text[0], *(f"fold{k}/{line}" for line in text[1:])]
        (fold / "predictions.csv").write_text("\n".join(rows) + "\n")
        folds.append(fold)
    summary = aggregate_runs(folds, tmp_path / "cv", n_resamples=20)
    one = json.loads((runs["masked"] / "metrics.json").read_text())["segmentation"]
    pooled = summary["pooled"]["segmentation"]
    assert pooled["images"] == 2 * one["images"] and pooled["dice"] == pytest.approx(one["dice"])
    assert "lesion-mask head" in (tmp_path / "cv" / "report.md").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.kwargs.seg_head=false"], r"has no mask head: .*model\.kwargs\.seg_head=true"),
        (["model.name=resnet18", "model.kwargs={}", "model.first_trainable_stage=layer4"], "no mask head"),
        (["model.first_trainable_stage=cnn.head,vit.head"], "freezes the CNN feature map the mask head"),
        (["model.first_trainable_stage=head"], "freezes the CNN feature map the mask head"),
        (["model.name=resnet18", "model.kwargs={seg_head: true}", "model.first_trainable_stage=head"],
         r"freezes the CNN feature map the mask head reads: train the CNN's last block \(e\.g\. layer4\)"),
    ],
)
def test_mask_training_that_cannot_train_the_head_is_one_error(
    busi_like: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(BreastvisionError, match=message):
        train(config(busi_like, tmp_path / "bad", "train.mask_loss_weight=0.5", *overrides))


def test_mask_training_needs_masks(image_tree, tmp_path: Path) -> None:
    with pytest.raises(BreastvisionError, match="no training image has a lesion mask"):
        train(config(image_tree(classes=("benign", "malignant", "normal"), per_class=4), tmp_path / "bad",
                     "train.mask_loss_weight=0.5"))


def test_a_negative_weight_is_refused_with_the_config(busi_like: Path, tmp_path: Path) -> None:
    with pytest.raises(BreastvisionError, match="mask_loss_weight"):
        config(busi_like, tmp_path, "train.mask_loss_weight=-1")


def test_a_single_densenet_trains_its_mask_head_on_cached_features(busi_like: Path, tmp_path: Path) -> None:
    """The quick-start recipe's shape on one CNN: DenseNet-121 split at denseblock4, its prefix
    outputs cached and the masks held beside them; the Dice reaches metrics.json, and the model file
    predicts through ``serving.predict`` without masks, exactly as the same weights without the head."""
    from breastvision.serving.predict import load_predictor, score_items

    run = train(config(busi_like, tmp_path / "densenet", "model.name=densenet121",
                       "model.kwargs={seg_head: true}", "model.first_trainable_stage=denseblock4",
                       "data.input_size=64", "train.mask_loss_weight=0.5", "train.cache_features=true",
                       "train.cache_backend=eager", "train.optimizer=sgd", "train.lr=0.05")).run_dir
    rows = history(run)
    assert all(r["train_loss"] > 0.5 * r["train_mask_loss"] > 0 for r in rows)
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["facts"]["feature_cache"]["used"]
    assert provenance["lineage"][-1]["trainable_stages"] == ["denseblock4", "head", "seg_head"]
    dice = json.loads((run / "metrics.json").read_text())["segmentation"]
    assert dice["images"] == provenance["facts"]["views"]["test"] and 0 < dice["lesion_images"]
    assert 0.0 <= dice["dice"] <= 1.0
    torch.manual_seed(0)  # the engine's seed: the head as it started
    initial = create_model("densenet121", num_classes=3, seg_head=True).seg_head.conv.weight
    bundle = ModelBundle.load(run / "model.safetensors")
    assert not torch.equal(bundle.state_dict["seg_head.conv.weight"], initial)

    predictor = load_predictor(run / "model.safetensors")
    images = sorted((busi_like / "malignant").glob("malignant ([0-9]).png"))
    scored = score_items(predictor, [(path, None) for path in images])
    assert len(scored.probs) == len(images) == 4 and not scored.failures
    plain = create_model("densenet121", num_classes=3).eval()
    plain.load_state_dict({k: v for k, v in bundle.state_dict.items() if not k.startswith("seg_head.")})
    batch = torch.stack([predictor.prepare_file(path) for path in images])
    with torch.no_grad():
        expected = torch.softmax(plain(batch).double(), 1).numpy()
    np.testing.assert_allclose(scored.uncalibrated, expected, rtol=1e-5, atol=1e-6)


class _Outputs(Dataset):
    """Cached prefix outputs (a fusion split's pair per item) as ``(outputs, label, index)``."""

    def __init__(self, outputs: list[tuple[torch.Tensor, torch.Tensor]], labels: list[int]) -> None:
        self.outputs, self.labels = outputs, labels

    def __len__(self) -> int:
        return len(self.outputs)

    def __getitem__(self, i: int) -> tuple[object, int, int]:
        return self.outputs[i], self.labels[i], i


def test_training_on_cached_outputs_with_masks_is_training_on_images(busi_like: Path) -> None:
    """Masks rendered once beside cached prefix outputs (``MaskedDataset``) train the same model as
    images rendered with their masks every step, random augmented draws included."""
    from breastvision.data.readers import read_dataset

    catalog = read_dataset(str(busi_like))
    items = [Item(r, catalog.relpath(r), f"aug{k}", i) for i, r in enumerate(catalog.records) for k in (0, 1)]
    renderer = ViewRenderer(ViewConfig(kind="random", count=2, seed=1), Preprocessing(input_size=224))
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    torch.manual_seed(0)
    model = create_model("fusion", num_classes=3, cnn="resnet18", vit="vit_tiny", seg_head=True)
    results = []
    for cached in (False, True):
        copy_ = copy.deepcopy(model)
        prefix, suffix = freeze_before(copy_, SPLIT)
        if cached:
            with torch.no_grad():
                outputs = [prefix(renderer(item).unsqueeze(0)) for item in items]
            pairs = [(cnn[0], vit[0]) for cnn, vit in outputs]
            dataset: Dataset = MaskedDataset(_Outputs(pairs, [i.record.label for i in items]),
                                             render_masks(renderer, items))
        else:
            dataset = ViewDataset(items, renderer, masks=True)
        optimizer = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=0.05)
        trainable, optimizer = fabric.setup(suffix, optimizer)
        trainable.mark_forward_method("forward_with_mask")
        torch.manual_seed(1)  # the same dropout masks
        fit = train_one_epoch(fabric, trainable, torch.nn.Identity() if cached else prefix,
                              DataLoader(dataset, batch_size=4), optimizer, torch.nn.CrossEntropyLoss(),
                              mask_weight=0.5)
        results.append((fit, copy_.state_dict()))
    (uncached, w_uncached), (cached_fit, w_cached) = results
    assert cached_fit["mask_loss"] == pytest.approx(uncached["mask_loss"], rel=1e-5)
    assert cached_fit["loss"] == pytest.approx(uncached["loss"], rel=1e-5)
    for key, value in w_uncached.items():
        torch.testing.assert_close(w_cached[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(w_cached["seg_head.conv.weight"], model.state_dict()["seg_head.conv.weight"])


def test_engine_with_feature_cache_and_masks_equals_uncached(busi_like: Path, tmp_path: Path) -> None:
    """The engine's own cached path: per-branch prefix outputs cached, masks rendered beside them."""
    common = ["train.mask_loss_weight=1", "train.cache_backend=eager", "train.optimizer=sgd"]
    cached = train(config(busi_like, tmp_path / "cached", "train.cache_features=true", *common)).run_dir
    cache = json.loads((cached / "provenance.json").read_text())["facts"]["feature_cache"]
    assert cache["used"] and len(cache["feature_shape"]) == 2  # the pair (CNN map, ViT features)
    uncached = train(config(busi_like, tmp_path / "uncached", *common)).run_dir
    for a, b in zip(history(cached), history(uncached), strict=True):
        for key in ("train_loss", "train_mask_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    w_uncached = weights(uncached)
    for key, value in weights(cached).items():
        torch.testing.assert_close(value, w_uncached[key], rtol=1e-3, atol=1e-5, msg=key)
    dice = [json.loads((run / "metrics.json").read_text())["segmentation"] for run in (cached, uncached)]
    assert dice[0] == pytest.approx(dice[1])
