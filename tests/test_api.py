"""The public Python API (``breastvision.api``, exported lazily at the top level) and its example."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import breastvision
from breastvision.errors import BreastvisionError

REPO = Path(__file__).resolve().parents[1]


def test_import_and_help_stay_light() -> None:
    """``import breastvision`` and building the CLI parser import neither torch nor numpy."""
    code = ("import sys, breastvision, breastvision.cli; breastvision.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_every_export_resolves() -> None:
    assert sorted(breastvision.__all__) == sorted(["__version__", *breastvision._EXPORTS])
    for name in breastvision._EXPORTS:
        assert getattr(breastvision, name).__name__ == name
    with pytest.raises(AttributeError):
        breastvision.no_such_name  # noqa: B018


def test_model_predicts_explains_and_evaluates(make_model_file, image_tree, tmp_path: Path) -> None:
    model = breastvision.load_model(make_model_file(class_names=("benign", "malignant")))
    assert model.class_names == ["benign", "malignant"]
    path = next(image_tree().rglob("*.png"))
    by_path = model.predict(path)
    assert by_path == model.predict(Image.open(path))
    np.testing.assert_allclose(list(model.predict(np.asarray(Image.open(path))).probabilities.values()),
                               list(by_path.probabilities.values()), atol=1e-6)
    assert sum(by_path.probabilities.values()) == pytest.approx(1, abs=1e-5)
    assert by_path.label == max(by_path.probabilities, key=by_path.probabilities.get)
    assert by_path.decisions == {}  # a model file without operating points
    grey = np.asarray(Image.open(path).convert("L"))
    assert set(model.predict(grey).probabilities) == {"benign", "malignant"}
    with pytest.raises(BreastvisionError, match="uint8"):
        model.predict(np.zeros((8, 8, 3), dtype=np.float32))

    run = model.predict_folder(image_tree())
    assert len(run.predictions) == 16 and not run.skipped

    explanation = model.explain(path, target="benign")
    assert explanation.label == "benign" and explanation.overlay.size == Image.open(path).size
    assert all(0 <= m.min() and m.max() <= 1 for m in explanation.heatmaps.values())
    with pytest.raises(BreastvisionError, match="unknown class"):
        model.explain(path, target="normal")

    evaluation = model.evaluate(str(image_tree()), out=tmp_path / "eval", n_resamples=20)
    assert evaluation.n_images == 16 and evaluation.report.is_file()
    assert 0 <= evaluation.metrics["accuracy"] <= 1


def test_predict_decides_at_the_stored_operating_points(make_model_file, image_tree, tmp_path: Path) -> None:
    from breastvision.models.bundle import ModelBundle

    bundle = ModelBundle.load(make_model_file(class_names=("benign", "malignant")))
    bundle.calibration = {"temperature": 2.0}
    bundle.operating_points = {"positive_class": "malignant", "target_sensitivity": 0.95,
                               "thresholds": {"low": 0.0, "high": 1.0}}
    model = breastvision.load_model(bundle.save(tmp_path / "calibrated.safetensors"))
    result = model.predict(next(image_tree().rglob("*.png")))
    assert result.decisions == {"low": True, "high": result.probabilities["malignant"] >= 1.0}


def test_train_takes_a_config_file_or_object(tmp_path: Path) -> None:
    config = breastvision.load_config(REPO / "configs" / "busi_fusion_cpu_noaug.yaml")
    with pytest.raises(BreastvisionError, match="overrides apply to a config file"):
        breastvision.train(config, ["train.epochs=1"])


@pytest.mark.slow
def test_example_script_runs(make_model_file, image_tree, tmp_path: Path) -> None:
    """examples/python_api.py in its demo mode: trains a tiny model, then uses every API call."""
    done = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "folder: 16 predicted, 0 skipped" in done.stdout
    assert (tmp_path / "explanation.png").is_file() and (tmp_path / "evaluation" / "report.md").is_file()
