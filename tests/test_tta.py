"""Test-time augmentation by named view set: hflip for ultrasound models, dihedral8 for histology,
recorded in the model file, used by predict / evaluate, and by training for validation and test."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy.special import softmax

from breastvision.cli import main
from breastvision.data.readers import read_dataset
from breastvision.data.transforms import TTA_VIEWS, apply_view
from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import TemperatureScaler
from breastvision.models.bundle import ModelBundle
from breastvision.models.ensemble import combine
from breastvision.models.tta import TTA_SETS, recorded_modality
from breastvision.serving.predict import load_predictor
from breastvision.training.engine import train
from test_training_engine import tiny_config


def _tinted(path: Path, label: int, seed: int, size: tuple[int, int] = (40, 48)) -> None:
    """A random RGB image tinted by its class (as ``conftest.image_tree``'s), left-right asymmetric
    enough that a model's view of it and of its mirror differ."""
    pixels = np.random.default_rng(seed).integers(0, 160, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., label % 3] += 95
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _busi_tree(root: Path, per_class: int = 6) -> Path:
    """A generated BUSI Kaggle tree: three class folders, each image with its ``_mask`` file."""
    for label, name in enumerate(("benign", "malignant", "normal")):
        for i in range(per_class):
            _tinted(root / name / f"{name} ({i}).png", label, 10 * label + i)
            Image.new("L", (40, 48)).save(root / name / f"{name} ({i})_mask.png")
    return root


def _breakhis_tree(root: Path) -> Path:
    """Generated files with official BreakHis names: 4 patients per class, 2 images each, 200X."""
    classes = (("B", ("A", "F", "PT", "TA")), ("M", ("DC", "LC", "MC", "PC")))
    for label, (cls, subtypes) in enumerate(classes):
        for p, subtype in enumerate(subtypes):
            for i in range(1, 3):
                name = f"SOB_{cls}_{subtype}-14-{1000 + 10 * label + p}-200-{i:03d}.png"
                _tinted(root / name, label, 100 * label + 10 * p + i)
    return root


def _bundle_with(make_model_file, **changes) -> ModelBundle:
    bundle = ModelBundle.load(make_model_file())
    for key, value in changes.items():
        setattr(bundle, key, value)
    return bundle


def _csv_probabilities(path: Path) -> np.ndarray:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return np.array([[float(v) for k, v in row.items() if k.startswith("p_")] for row in rows])


def test_view_sets_start_with_the_image_and_are_named_alike_everywhere() -> None:
    assert tuple(TTA_VIEWS) == TTA_SETS == ("dihedral8", "hflip")
    assert TTA_VIEWS["hflip"] == ("identity", "hflip")
    assert all(views[0] == "identity" for views in TTA_VIEWS.values())  # what the engine relies on
    assert len(set(TTA_VIEWS["dihedral8"])) == 8 and set(TTA_VIEWS["hflip"]) <= set(TTA_VIEWS["dihedral8"])


def test_hflip_tta_is_the_mean_of_the_image_and_its_mirror(make_model_file, tmp_path: Path) -> None:
    bundle = _bundle_with(make_model_file, calibration={"method": "temperature scaling", "temperature": 2.0})
    predictor = load_predictor(bundle.save(tmp_path / "calibrated.safetensors"))
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mirrored = predictor.probabilities(x.flip(-1))
    hflip = predictor.probabilities(x, tta="hflip")
    np.testing.assert_allclose(hflip, (predictor.probabilities(x) + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(predictor.probabilities(x.flip(-1), tta="hflip"), hflip, atol=1e-6)
    # Not the 8-view mean, nor the image alone: the set decides what is averaged.
    assert np.abs(hflip - predictor.probabilities(x, tta="dihedral8")).max() > 1e-4
    assert np.abs(hflip - predictor.probabilities(x)).max() > 1e-4
    with pytest.raises(BreastvisionError, match="unknown test-time augmentation view set 'rot90'"):
        predictor.probabilities(x, tta="rot90")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"lineage": [{"stage": "busi_f0", "data": "busi (busi)"}]}, "hflip"),          # an older BUSI file
    ({"lineage": [{"stage": "h", "data": "breakhis (breakhis)"}]}, "dihedral8"),   # an older BreakHis file
    ({"lineage": [{"stage": "x", "data": "hospital (/data/hospital)"}]}, "dihedral8"),  # unknown modality
    ({"lineage": [{"stage": "x", "data": "scans (/x)", "modality": "ultrasound"}]}, "hflip"),
    ({"lineage": [{"stage": "x", "data": "tiles (/x)"}], "mpp": True}, "dihedral8"),  # a µm/px scale
    ({"lineage": [{"stage": "busi_f0", "data": "busi (busi)"}], "tta": "dihedral8"}, "dihedral8"),  # recorded
])
def test_model_file_default_view_set(make_model_file, tmp_path: Path, changes: dict, expected: str) -> None:
    mpp = (0.5, 0.5) if changes.pop("mpp", False) else None
    bundle = ModelBundle.load(make_model_file(mpp=mpp))
    for key, value in changes.items():
        setattr(bundle, key, value)
    saved = bundle.save(tmp_path / "m.safetensors")
    loaded = ModelBundle.load(saved)
    assert loaded.tta == changes.get("tta") and loaded.default_tta == expected
    predictor = load_predictor(saved)
    assert predictor.resolve_tta(True) == expected and predictor.resolve_tta(False) is None
    assert predictor.card()["tta"] == {"set": expected, "views": list(TTA_VIEWS[expected]),
                                       "recorded": "tta" in changes}


def test_a_file_naming_an_unknown_view_set_is_refused(make_model_file, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = make_model_file()
    with safe_open(str(source), framework="pt") as handle:
        meta = json.loads(handle.metadata()["breastvision"])
    bad = tmp_path / "bad.safetensors"
    meta["tta"] = "rot8"
    save_file(load_file(str(source)), str(bad), metadata={"breastvision": json.dumps(meta)})
    with pytest.raises(BreastvisionError, match="tta"):
        ModelBundle.load(bad)


def test_readers_record_the_modality(tmp_path: Path) -> None:
    assert read_dataset(_busi_tree(tmp_path / "busi")).meta["modality"] == "ultrasound"
    assert read_dataset(_breakhis_tree(tmp_path / "breakhis")).meta["modality"] == "histology"
    (tmp_path / "plain" / "a").mkdir(parents=True)
    for label, name in enumerate("ab"):
        _tinted(tmp_path / "plain" / name / "x.png", label, label)
    assert "modality" not in read_dataset(tmp_path / "plain").meta


def test_an_ensemble_averages_the_views_its_members_accept(make_model_file) -> None:
    busi = _bundle_with(make_model_file, lineage=[{"stage": "u", "modality": "ultrasound"}], tta="hflip")
    histology = _bundle_with(make_model_file, lineage=[{"stage": "h", "modality": "histology"}],
                             tta="dihedral8")
    assert combine([busi, busi]).default_tta == "hflip"
    assert combine([histology, histology]).default_tta == "dihedral8"
    assert combine([busi, histology]).tta == "hflip"  # the image and its mirror are among the 8
    # An older ensemble file (no tta) follows its members' recorded modality.
    old = combine([busi, busi])
    old.tta = None
    assert recorded_modality(old.metadata()) == "ultrasound" and old.default_tta == "hflip"


def test_a_view_stack_is_calibrated_as_the_mean_predictors_give() -> None:
    rng = np.random.default_rng(3)
    stack = rng.normal(0, 3, (2, 40, 3))
    labels = rng.integers(0, 3, 40)
    scaler = TemperatureScaler().fit(stack, labels)
    temperatures = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    def mean_nll(t: float) -> float:
        mean = np.mean([softmax(z / t, axis=1) for z in stack], axis=0)
        return float(-np.log(mean[np.arange(40), labels]).mean())

    best = temperatures[int(np.argmin([mean_nll(t) for t in temperatures]))]
    assert scaler.temperature_ == pytest.approx(best, rel=5e-3)
    np.testing.assert_allclose(scaler.transform(stack),
                               np.mean([softmax(z / scaler.temperature_, axis=1) for z in stack], axis=0))
    one = TemperatureScaler().fit(stack[:1], labels)
    assert one.temperature_ == pytest.approx(TemperatureScaler().fit(stack[0], labels).temperature_)
    assert one.temperature_ != pytest.approx(scaler.temperature_, rel=1e-2)


@pytest.fixture(scope="module")
def busi_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained one epoch on a generated BUSI tree (no data.tta)."""
    root = tmp_path_factory.mktemp("busi")
    source = _busi_tree(root / "Dataset_BUSI_with_GT")
    return train(tiny_config(source, root / "run", "train.epochs=1")).run_dir


def test_training_records_the_modality_and_its_view_set(busi_run: Path, tmp_path: Path) -> None:
    bundle = ModelBundle.load(busi_run / "model.safetensors")
    assert bundle.lineage[-1]["modality"] == "ultrasound" and bundle.tta == "hflip"
    histology = train(tiny_config(_breakhis_tree(tmp_path / "breakhis"), tmp_path / "h", "train.epochs=1"))
    bundle = ModelBundle.load(histology.model_file)
    assert bundle.lineage[-1]["modality"] == "histology" and bundle.tta == "dihedral8"
    assert bundle.preprocessing.mpp is not None  # BreakHis: the scale is known too


def test_predict_tta_on_a_busi_model_averages_the_mirror_and_says_so(
    busi_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = busi_run / "model.safetensors"
    image = tmp_path / "scan.png"
    _tinted(image, 0, 7, size=(52, 44))
    out = tmp_path / "tta.json"
    assert main(["predict", str(model), str(image), "--tta", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["tta"] == "hflip" and document["tta_views"] == ["identity", "hflip"]
    predictor = load_predictor(model)
    x = predictor.prepare_file(image).unsqueeze(0)
    by_hand = (predictor.probabilities(x) + predictor.probabilities(apply_view(x, "hflip"))) / 2
    got = [document["predictions"][0]["probabilities"][c] for c in predictor.class_names]
    np.testing.assert_allclose(got, by_hand[0], atol=1e-6)
    csv_out = tmp_path / "tta.csv"
    capsys.readouterr()
    assert main(["predict", str(model), str(image), "--tta", "--out", str(csv_out)]) == 0
    assert "test-time augmentation: hflip (identity, hflip)" in capsys.readouterr().out
    np.testing.assert_allclose(_csv_probabilities(csv_out), by_hand, atol=2e-6)
    # --tta-views overrides the model's own set (and implies --tta).
    assert main(["predict", str(model), str(image), "--tta-views", "dihedral8", "--out", str(out)]) == 0
    document = json.loads(out.read_text())
    assert document["tta"] == "dihedral8" and len(document["tta_views"]) == 8
    assert main(["predict", str(model), str(image), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tta"] is None
    with pytest.raises(SystemExit):
        main(["predict", str(model), str(image), "--tta-views", "rot90"])


def test_evaluate_tta_names_the_views(busi_run: Path, tmp_path: Path) -> None:
    source = busi_run.parent / "Dataset_BUSI_with_GT"
    out = tmp_path / "eval"
    assert main(["evaluate", str(busi_run / "model.safetensors"), str(source), "--split",
                 str(busi_run / "split.json"), "--tta", "--out", str(out), "--n-resamples", "0"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["tta"] == "hflip"
    assert "hflip (identity, hflip)" in (out / "report.md").read_text()


def _val_rows(run: Path) -> list[dict[str, str]]:
    with (run / "val_predictions.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("cache", ["true", "false"])
def test_training_with_hflip_scores_validation_and_test_under_it(
    image_tree, tmp_path: Path, cache: str
) -> None:
    """Same seed with and without data.tta: the same weights (the epochs select on the images as
    given), but validation predictions, temperature and test predictions of the hflip mean."""
    source = image_tree()
    # A small step keeps the validation temperature inside the searched range, where it says something.
    common = ["train.epochs=1", "train.lr=0.0003", f"train.cache_features={cache}"]
    plain = train(tiny_config(source, tmp_path / "plain", *common)).run_dir
    run = train(tiny_config(source, tmp_path / "hflip", *common, "data.tta=hflip")).run_dir
    bundle = ModelBundle.load(run / "model.safetensors")
    assert bundle.tta == "hflip"
    for key, value in ModelBundle.load(plain / "model.safetensors").state_dict.items():
        torch.testing.assert_close(value, bundle.state_dict[key], msg=key)
    facts = json.loads((run / "provenance.json").read_text())["facts"]
    assert facts["test_time_augmentation"] == "hflip"
    assert facts["feature_cache"]["used"] is (cache == "true")

    rows = _val_rows(run)
    probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in rows])
    plain_probs = np.array([[float(v) for k, v in r.items() if k.startswith("p_")] for r in _val_rows(plain)])
    assert [r["path"] for r in rows] == [r["path"] for r in _val_rows(plain)]
    assert np.abs(probs - plain_probs).max() > 1e-4

    # By hand: each validation image and its mirror through the model file's network.
    predictor = load_predictor(run / "model.safetensors")
    images = torch.stack([predictor.prepare_file(source / r["path"]) for r in rows])
    np.testing.assert_allclose(probs, predictor.probabilities(images, tta="hflip"), atol=1e-5)
    stack = torch.stack([predictor.logits(images), predictor.logits(images.flip(-1))]).double().numpy()
    labels = [predictor.class_names.index(r["true_label"]) for r in rows]
    fitted = {views: TemperatureScaler().fit(stack[:views], labels).temperature_ for views in (1, 2)}
    assert bundle.temperature == pytest.approx(fitted[2], rel=1e-3)
    assert bundle.temperature != pytest.approx(fitted[1], rel=1e-2)  # not the image alone's
    with (run / "predictions.csv").open() as handle:
        tested = torch.stack([predictor.prepare_file(source / r["path"]) for r in csv.DictReader(handle)])
    np.testing.assert_allclose(_csv_probabilities(run / "predictions.csv"),
                               predictor.probabilities(tested, tta="hflip"), atol=1e-5)


def test_the_web_answer_and_card_name_the_views(busi_run: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from breastvision.serving.web import create_app

    model = busi_run / "model.safetensors"
    image = tmp_path / "scan.png"
    _tinted(image, 1, 8, size=(52, 44))
    predictor = load_predictor(model)
    expected = predictor.probabilities(predictor.prepare_file(image).unsqueeze(0), tta="hflip")[0]
    with TestClient(create_app(model, tta=True)) as client:
        assert client.get("/api/model").json()["tta"] == {"set": "hflip", "views": ["identity", "hflip"],
                                                          "recorded": True}
        upload = {"file": ("scan.png", image.read_bytes(), "image/png")}
        body = client.post("/api/predict", files=upload).json()
    assert body["tta"] == "hflip"
    np.testing.assert_allclose([body["probabilities"][c] for c in body["class_names"]], expected, atol=1e-6)
