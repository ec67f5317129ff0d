"""The out-of-scope flag (``models.scope``): fitting, separation of off-domain inputs, the model file's
round trip and validation, and the flag in predict's CSV and JSON and the Python API."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from breastvision.cli import main
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle
from breastvision.models.scope import MEANS_KEY, QUANTILE, Scope
from breastvision.training.scope import image_features


def _gaussian_classes(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(size=(n, centres.shape[1])), labels


def test_scope_flags_far_features_and_lets_in_domain_ones_through() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3, size=(3, 64))
    # Fewer images in a class than dimensions: the shrunk covariance must still be invertible.
    train, labels = _gaussian_classes(rng, 120, centres)
    val, _ = _gaussian_classes(rng, 400, centres)
    test, _ = _gaussian_classes(rng, 1000, centres)
    far = rng.normal(size=(1000, 64)) * 2.5 + rng.normal(scale=3, size=64)  # another domain
    scope = Scope.fit(train, labels, val)
    assert np.quantile(scope.score(val), QUANTILE) == pytest.approx(scope.threshold)
    in_scores, far_scores = scope.score(test), scope.score(far)
    auroc = roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(far))], np.r_[in_scores, far_scores])
    assert auroc > 0.99
    assert np.mean([scope.outside(s) for s in in_scores]) < 0.1  # about 5% by construction
    assert np.mean([scope.outside(s) for s in far_scores]) > 0.9


def test_scope_score_is_the_nearest_class_distance() -> None:
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    scope = Scope(means, torch.diag(torch.tensor([1.0, 0.25])), threshold=3.0)
    np.testing.assert_allclose(scope.score(np.array([[0.0, 4.0], [9.0, 0.0]])), [2.0, 1.0], atol=1e-6)


def test_scope_refuses_features_without_labels() -> None:
    with pytest.raises(BreastvisionError, match="a label each"):
        Scope.fit(np.zeros((5, 3)), [0, 1], np.zeros((2, 3)))


def _image(path: Path, seed: int, far: bool) -> Path:
    rng = np.random.default_rng(seed)
    if far:  # saturated colour noise
        pixels = rng.integers(0, 256, (64, 64, 3))
    else:  # dim, nearly flat grey
        pixels = np.repeat(rng.normal(60, 4, (64, 64, 1)), 3, axis=2)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def scoped(make_model_file, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A model file with a scope fitted on grey images, and a folder of grey and colour-noise images."""
    root = tmp_path_factory.mktemp("scope")
    fit_dir, inputs = root / "fit", root / "inputs"
    fit_dir.mkdir()
    inputs.mkdir()
    bundle = ModelBundle.load(make_model_file("resnet18"))
    model = bundle.build_model()
    records = [(str(_image(fit_dir / f"{i}.png", i, far=False)), i % 3) for i in range(30)]
    x, y = image_features(model, records[:20], bundle.preprocessing)
    val_x, _ = image_features(model, records[20:], bundle.preprocessing)
    bundle.scope = Scope.fit(x, y, val_x)
    for i in range(3):
        _image(inputs / f"grey{i}.png", 100 + i, far=False)
        _image(inputs / f"noise{i}.png", 200 + i, far=True)
    return bundle.save(root / "scoped.safetensors"), inputs


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_flags_off_domain_images_in_csv_and_json(scoped: tuple[Path, Path], tmp_path: Path) -> None:
    model_file, inputs = scoped
    (inputs.parent / "broken.png").write_text("not a png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(model_file), str(inputs), str(inputs.parent / "broken.png"),
                 "--out", str(out)]) == 0
    rows = _rows(out)
    assert list(rows[0])[-3:] == ["out_of_scope", "scope_score", "skipped"]
    flags = {Path(r["path"]).name: r["out_of_scope"] for r in rows if not r["skipped"]}
    expected = {**{f"grey{i}.png": "False" for i in range(3)}, **{f"noise{i}.png": "True" for i in range(3)}}
    assert flags == expected
    assert [(r["out_of_scope"], r["scope_score"]) for r in rows if r["skipped"]] == [("", "")]
    # The score is the stored scope's, of the features computed by hand.
    bundle = ModelBundle.load(model_file)
    x, _ = image_features(bundle.build_model(), [(str(inputs / "noise0.png"), 0)], bundle.preprocessing)
    score = next(float(r["scope_score"]) for r in rows if r["path"].endswith("noise0.png"))
    assert score == pytest.approx(float(bundle.scope.score(x)[0]), rel=1e-3)
    document_file = tmp_path / "p.json"
    assert main(["predict", str(model_file), str(inputs / "noise1.png"), "--out", str(document_file)]) == 0
    prediction = json.loads(document_file.read_text())["predictions"][0]
    assert prediction["out_of_scope"] is True and prediction["scope_score"] > bundle.scope.threshold


def test_api_result_carries_the_flag(scoped: tuple[Path, Path], make_model_file) -> None:
    from breastvision.api import load_model

    model_file, inputs = scoped
    assert load_model(model_file).predict(inputs / "noise2.png").out_of_scope is True
    assert load_model(model_file).predict(inputs / "grey2.png").out_of_scope is False
    plain = load_model(make_model_file("resnet18")).predict(inputs / "grey2.png")
    assert plain.out_of_scope is None and plain.scope_score is None


def test_a_file_without_scope_leaves_the_columns_blank(make_model_file, scoped, tmp_path: Path) -> None:
    _, inputs = scoped
    out = tmp_path / "p.csv"
    assert main(["predict", str(make_model_file("resnet18")), str(inputs), "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 6 and all(r["out_of_scope"] == "" and r["scope_score"] == "" for r in rows)


def test_bad_scope_in_a_model_file_is_a_one_line_error(scoped: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    model_file, inputs = scoped
    with safe_open(str(model_file), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    wrong = tmp_path / "wrong.safetensors"
    save_file({**tensors, MEANS_KEY: torch.zeros(2, 7)}, str(wrong), metadata=meta)
    with pytest.raises(BreastvisionError, match=r"scope tensors have shapes \[2, 7\]"):
        ModelBundle.load(wrong)
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in tensors.items() if k != MEANS_KEY}, str(missing), metadata=meta)
    assert main(["predict", str(missing), str(inputs), "--out", str(tmp_path / "p.csv")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "lacks the scope.means" in error
    document = json.loads(meta["breastvision"])
    document["scope"]["threshold"] = -1
    negative = tmp_path / "negative.safetensors"
    save_file(tensors, str(negative), metadata={"breastvision": json.dumps(document)})
    with pytest.raises(BreastvisionError, match="scope.threshold"):
        ModelBundle.load(negative)
