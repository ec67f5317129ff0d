"""Ensemble model files: the mean of the members' calibrated probabilities, everywhere a model file goes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import breastvision
from breastvision.cli import main
from breastvision.errors import BreastvisionError
from breastvision.evaluation.evaluate import evaluate_model
from breastvision.explanation.gradcam import explain
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.ensemble import ensemble_files
from breastvision.models.registry import create_model
from breastvision.serving.export import export_onnx
from breastvision.serving.predict import load_predictor
from breastvision.serving.web import create_app

CLASSES = ["benign", "malignant"]


def _member(folder: Path, architecture: str, seed: int, temperature: float,
            class_names: list[str] = CLASSES) -> Path:
    torch.manual_seed(seed)
    model = create_model(architecture, num_classes=len(class_names))
    bundle = ModelBundle(architecture, list(class_names), model.state_dict(), model_kwargs=model.model_kwargs,
                         preprocessing=Preprocessing(input_size=64),
                         calibration={"method": "temperature scaling", "temperature": temperature})
    return bundle.save(folder / f"{architecture}_{seed}.safetensors")


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("members")
    # Two architectures, and temperatures far from 1 and from each other, so that averaging logits
    # or ignoring a member's temperature would both show.
    return [_member(folder, "resnet18", 0, 0.5), _member(folder, "resnet18", 1, 3.0),
            _member(folder, "googlenet", 2, 1.7)]


@pytest.fixture(scope="module")
def ensemble(members, tmp_path_factory) -> Path:
    return ensemble_files(members, tmp_path_factory.mktemp("ensemble") / "ens.safetensors")


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_probabilities_are_the_mean_of_the_members_calibrated_ones(members, ensemble) -> None:
    batch = _batch()
    expected = np.mean([load_predictor(m).probabilities(batch) for m in members], axis=0)
    got = load_predictor(ensemble).probabilities(batch)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # Not the mean of the uncalibrated ones: the temperatures matter.
    raw = np.mean([torch.softmax(load_predictor(m).logits(batch), 1).numpy() for m in members], axis=0)
    assert np.abs(got - raw).max() > 1e-3


def test_file_round_trips_and_keeps_each_member(members, ensemble, tmp_path: Path) -> None:
    bundle = ModelBundle.load(ensemble)
    assert bundle.architecture == "ensemble" and bundle.class_names == CLASSES
    assert [m["architecture"] for m in bundle.ensemble["members"]] == ["resnet18", "resnet18", "googlenet"]
    assert [m["calibration"]["temperature"] for m in bundle.ensemble["members"]] == [0.5, 3.0, 1.7]
    again = ModelBundle.load(bundle.save(tmp_path / "again.safetensors"))
    assert again.metadata() == bundle.metadata()
    assert all(torch.equal(again.state_dict[k], v) for k, v in bundle.state_dict.items())
    # An ensemble given to `ensemble` contributes its members: the result is flat.
    nested = ModelBundle.load(ensemble_files([ensemble, members[0]], tmp_path / "nested.safetensors"))
    assert len(nested.ensemble["members"]) == 4


def test_mismatched_class_names_are_a_one_line_error(members, tmp_path: Path, capsys) -> None:
    other = _member(tmp_path, "resnet18", 3, 1.0, ["normal", "malignant"])
    with pytest.raises(BreastvisionError, match="class names .* differ") as err:
        ensemble_files([members[0], other], tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)
    assert main(["ensemble", str(members[0]), str(other), "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
    resized = ModelBundle.load(members[1])
    resized.preprocessing = Preprocessing(input_size=64, resize=72)
    with pytest.raises(BreastvisionError, match="pre-processing differs"):
        ensemble_files([members[0], resized.save(tmp_path / "r.safetensors")], tmp_path / "b.safetensors")


def test_metadata_without_members_is_refused(ensemble) -> None:
    meta = ModelBundle.load(ensemble).metadata()
    with pytest.raises(BreastvisionError, match="goes with an 'ensemble' entry"):
        ModelBundle.from_metadata({k: v for k, v in meta.items() if k != "ensemble"}, {})
    meta["ensemble"]["members"][1]["class_names"] = ["b", "m"]
    with pytest.raises(BreastvisionError, match="class names differ"):
        ModelBundle.from_metadata(meta, {})


def test_one_onnx_graph_matches_pytorch(ensemble, tmp_path: Path) -> None:
    result = export_onnx(ensemble, tmp_path / "ens.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    batch = _batch(1)
    np.testing.assert_allclose(load_predictor(result.path).probabilities(batch),
                               load_predictor(ensemble).probabilities(batch), atol=1e-4)


def test_gradcam_is_the_mean_of_the_members_maps(members, ensemble) -> None:
    image = _batch(2)[0]
    explained = explain(load_predictor(ensemble).model, image)
    singles = [explain(load_predictor(m).model, image, architecture=ModelBundle.load(m).architecture,
                       target=explained.target).primary for m in members]
    np.testing.assert_allclose(explained.heatmaps["ensemble"], np.mean(singles, axis=0), atol=1e-6)
    assert list(explained.heatmaps)[0] == "ensemble" and len(explained.heatmaps) == 4


def test_predict_cli_evaluate_web_and_python_api(ensemble, image_tree, tmp_path: Path) -> None:
    images = image_tree(tuple(CLASSES), per_class=3)
    out = tmp_path / "p.json"
    assert main(["predict", str(ensemble), str(images), "--out", str(out), "--explain",
                 str(tmp_path / "maps")]) == 0
    rows = json.loads(out.read_text())["predictions"]
    assert len(rows) == 6 and len(list((tmp_path / "maps").glob("*_ensemble.png"))) == 6
    model = breastvision.load_model(ensemble)
    first = images / rows[0]["path"].split("/", 1)[1]
    probs = model.predict(first).probabilities
    assert probs == pytest.approx(rows[0]["probabilities"], abs=1e-6)
    evaluation = evaluate_model(ensemble, str(images), out=tmp_path / "eval", n_resamples=0)
    assert evaluation.metrics["n_images"] == 6
    with TestClient(create_app(ensemble)) as client:
        body = client.post("/api/predict", files={"file": ("a.png", first.read_bytes(), "image/png")},
                           data={"explain": "true"}).json()
    assert body["probabilities"] == pytest.approx(probs, abs=1e-6)
    assert set(body["explanation"]["layers"]) == {"member0.gradcam", "member1.gradcam", "member2.gradcam"}


def test_an_ensemble_has_no_temperature_or_operating_points_unless_calibrated(ensemble) -> None:
    bundle = ModelBundle.load(ensemble)
    assert bundle.calibration is None and bundle.operating_points is None and bundle.temperature == 1.0


def test_calibrate_on_held_out_data_fits_the_ensembles_own_calibration(members, image_tree, tmp_path: Path,
                                                                      capsys) -> None:
    held_out = image_tree(tuple(CLASSES), per_class=6, seed=3)
    out = tmp_path / "calibrated.safetensors"
    assert main(["ensemble", *map(str, members), "--calibrate-on", str(held_out), "--out", str(out)]) == 0
    assert "calibrated on" in capsys.readouterr().out
    bundle = ModelBundle.load(out)
    calibration = bundle.calibration
    assert str(held_out) in calibration["fitted_on"] and calibration["n_images"] == 12
    assert calibration["nll_after"] < calibration["nll_before"] and bundle.temperature != 1.0
    assert set(bundle.operating_points["thresholds"]) == {"sensitivity>=0.95", "youden"}
    # The predictor applies the ensemble's temperature on top of the members' own, in every back-end.
    batch = _batch(4)
    mean = np.mean([load_predictor(m).probabilities(batch) for m in members], axis=0)
    expected = torch.softmax(torch.from_numpy(np.log(mean)) / bundle.temperature, 1).numpy()
    np.testing.assert_allclose(load_predictor(out).probabilities(batch), expected, atol=1e-5)
    exported = export_onnx(out, tmp_path / "calibrated.onnx").path
    np.testing.assert_allclose(load_predictor(exported).probabilities(batch), expected, atol=1e-4)
    # Decisions at the fitted operating points, as for a single model file.
    table = tmp_path / "p.csv"
    assert main(["predict", str(out), str(held_out), "--out", str(table), "--operating-point", "youden"]) == 0
    header = table.read_text().splitlines()[0].split(",")
    assert {"malignant_at_sensitivity>=0.95", "malignant_at_youden", "decision"} <= set(header)


def test_calibrating_on_a_members_training_data_is_refused(members, image_tree, tmp_path: Path,
                                                          capsys) -> None:
    from breastvision.data.readers import read_dataset
    from breastvision.data.splits import make_split

    images = image_tree(tuple(CLASSES), per_class=6, seed=4)
    split = make_split(read_dataset(str(images)), "group_holdout", 0, fractions=(0.5, 0.25, 0.25))
    split_file = split.save(tmp_path / "split.json")
    trained = ModelBundle.load(members[0])
    trained.lineage = [{"stage": "tiny", "split": {"file": str(split_file), "fold": None}}]
    member = trained.save(tmp_path / "trained.safetensors")
    out = tmp_path / "e.safetensors"
    capsys.readouterr()
    command = ["ensemble", str(member), str(members[1]), "--calibrate-on", str(images), "--out", str(out)]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in member 1's training or validation data" in err[0] and not out.exists()
