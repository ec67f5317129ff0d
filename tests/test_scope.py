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
from breastvision.models.scope import (
    MEANS_KEY,
    PRE_LOGITS,
    PRECISION_KEY,
    QUANTILE,
    Layer,
    Scope,
    default_layers,
    tapped,
)
from breastvision.training.scope import image_features


def _gaussian_classes(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(size=(n, centres.shape[1])), labels


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def test_scope_flags_far_features_and_lets_in_domain_ones_through() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3, size=(3, 64))
    # Fewer images in a class than dimensions: the shrunk covariance must still be invertible.
    train, labels = _gaussian_classes(rng, 120, centres)
    val, _ = _gaussian_classes(rng, 400, centres)
    test, _ = _gaussian_classes(rng, 4000, centres)
    far = rng.normal(size=(1000, 64)) * 2.5 + rng.normal(scale=3, size=64)  # another domain
    scope = Scope.fit({PRE_LOGITS: train}, labels, {PRE_LOGITS: val})
    in_scores, far_scores = scope.score({PRE_LOGITS: test}), scope.score({PRE_LOGITS: far})
    assert _auroc(in_scores, far_scores) > 0.99
    # The threshold targets 2.5% false flags; new in-domain images stay well under the 5% target.
    assert np.mean([scope.outside(s) for s in in_scores]) < 0.05
    assert np.mean([scope.outside(s) for s in far_scores]) > 0.9


def test_threshold_is_the_validation_quantile_not_the_training_one() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=3, size=(2, 48))
    train, labels = _gaussian_classes(rng, 100, centres)  # D/N large: training distances are optimistic
    val, _ = _gaussian_classes(rng, 300, centres)
    scope = Scope.fit({PRE_LOGITS: train}, labels, {PRE_LOGITS: val})
    assert QUANTILE == 0.975
    assert scope.threshold == pytest.approx(np.quantile(scope.score({PRE_LOGITS: val}), QUANTILE))
    assert np.quantile(scope.score({PRE_LOGITS: train}), QUANTILE) < scope.threshold
    assert scope.n_validation == 300 and scope.threshold_from == "validation 97.5% quantile"
    # Standardised on validation: the validation distances have mean 0 and standard deviation 1.
    distances = scope.layers[0].standardised(val)
    assert abs(distances.mean()) < 1e-9 and distances.std() == pytest.approx(1.0)


def test_a_lower_layer_catches_a_near_domain_the_penultimate_layer_misses() -> None:
    """Near off-domain inputs look in-domain to the classifier's features and differ in the
    lower-level statistics: only the multi-layer score separates them."""
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=3, size=(2, 32))
    texture = rng.normal(size=16)

    def sample(n: int, shift: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
        head, labels = _gaussian_classes(rng, n, centres)
        return {"block1": texture + shift + rng.normal(size=(n, 16)), PRE_LOGITS: head}, labels

    (train, labels), (val, _), (test, _), (near, _) = (sample(200, 0), sample(200, 0), sample(500, 0),
                                                      sample(500, 1.5))
    both = Scope.fit(train, labels, val)
    head_only = Scope.fit({PRE_LOGITS: train[PRE_LOGITS]}, labels, {PRE_LOGITS: val[PRE_LOGITS]})
    assert both.layer_names == ["block1", PRE_LOGITS]
    assert _auroc(both.score(test), both.score(near)) > 0.95
    assert _auroc(head_only.score(test), head_only.score(near)) < 0.6


def test_scope_score_is_the_nearest_class_distance() -> None:
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    layer = Layer(PRE_LOGITS, means, torch.diag(torch.tensor([1.0, 0.25])))
    np.testing.assert_allclose(layer.distance(np.array([[0.0, 4.0], [9.0, 0.0]])), [2.0, 1.0], atol=1e-6)
    standardised = Layer("b", means, torch.eye(2), centre=1.0, spread=2.0)
    scope = Scope([layer, standardised], threshold=3.0)
    # [2, 1] + ([4, 1] - 1) / 2
    points = [[0.0, 4.0], [9.0, 0.0]]
    np.testing.assert_allclose(scope.score({PRE_LOGITS: points, "b": points}), [3.5, 1.0], atol=1e-6)


def test_scope_refuses_features_without_labels() -> None:
    with pytest.raises(BreastvisionError, match="a label each"):
        Scope.fit({PRE_LOGITS: np.zeros((5, 3))}, [0, 1], {PRE_LOGITS: np.zeros((2, 3))})


def test_default_layers_and_the_tap(make_model_file) -> None:
    bundle = ModelBundle.load(make_model_file("resnet18"))
    model = bundle.build_model().eval()
    layers = default_layers(model)
    assert layers == ["layer1", "layer2", "layer3", PRE_LOGITS]
    batch = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with tapped(model, layers) as tap:
        logits, features = tap.features(batch)
        model(batch)  # a plain forward pass keeps nothing and changes nothing
    with torch.inference_mode():
        expected = model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(batch))))))
    np.testing.assert_allclose(features["layer2"], expected.mean((2, 3)).numpy(), atol=1e-5)
    assert features[PRE_LOGITS].shape == (2, 512) and logits.shape == (2, 3)
    assert not model._forward_hooks and not model.layer1._forward_hooks  # hooks gone after the block
    with pytest.raises(BreastvisionError, match="no layer cnn.nowhere"):
        tapped(model, ["cnn.nowhere"]).__enter__()


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
    with tapped(model, default_layers(model)) as tap:
        x, y = image_features(tap, records[:20], bundle.preprocessing)
        val_x, _ = image_features(tap, records[20:], bundle.preprocessing)
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
    model = bundle.build_model()
    with tapped(model, bundle.scope.layer_names) as tap:
        x, _ = image_features(tap, [(str(inputs / "noise0.png"), 0)], bundle.preprocessing)
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


def _file_parts(model_file: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return json.loads(meta["breastvision"]), tensors


def _write(path: Path, document: dict, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"breastvision": json.dumps(document)})
    return path


def test_bad_scope_in_a_model_file_is_a_one_line_error(scoped: tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    model_file, inputs = scoped
    document, tensors = _file_parts(model_file)
    means_key = ModelBundle.load(model_file).scope.layers[1].keys()[0]
    wrong = _write(tmp_path / "wrong.safetensors", document, {**tensors, means_key: torch.zeros(2, 7)})
    with pytest.raises(BreastvisionError, match=r"scope tensors have shapes \[2, 7\]"):
        ModelBundle.load(wrong)
    missing = _write(tmp_path / "missing.safetensors", document,
                     {k: v for k, v in tensors.items() if k != means_key})
    assert main(["predict", str(missing), str(inputs), "--out", str(tmp_path / "p.csv")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and f"lacks the {means_key}" in error
    for key, value, message in (("spread", 0.0, "spread"), ("name", "", "name")):
        bad = json.loads(json.dumps(document))
        bad["scope"]["layers"][0][key] = value
        with pytest.raises(BreastvisionError, match=message):
            ModelBundle.load(_write(tmp_path / f"bad_{key}.safetensors", bad, tensors))


def _as_older_file(model_file: Path, out: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The file as the release before per-layer statistics wrote it: the penultimate layer alone, as
    ``scope.means`` / ``scope.precision``, with plain distances and no ``layers`` entry."""
    document, tensors = _file_parts(model_file)
    head = ModelBundle.load(model_file).scope.layers[-1]
    weights = {k: v for k, v in tensors.items() if not k.startswith("scope.")}
    document["scope"] = {"method": "mahalanobis", "threshold": 5.0, "fitted_on": "train",
                         "threshold_from": "validation 95% quantile", "n_images": 20,
                         "feature_dim": int(head.means.shape[1]), "n_classes": int(head.means.shape[0])}
    return _write(out, document, {**weights, MEANS_KEY: head.means, PRECISION_KEY: head.precision}), \
        head.means, head.precision


def test_older_files_load_and_score_as_before(scoped: tuple[Path, Path], tmp_path: Path) -> None:
    model_file, inputs = scoped
    older, means, precision = _as_older_file(model_file, tmp_path / "older.safetensors")
    bundle = ModelBundle.load(older)
    assert bundle.scope.layer_names == [PRE_LOGITS] and bundle.scope.threshold == 5.0
    out = tmp_path / "p.csv"
    assert main(["predict", str(older), str(inputs), "--out", str(out)]) == 0
    model = bundle.build_model()
    with tapped(model, [PRE_LOGITS]) as tap:
        x, _ = image_features(tap, [(str(inputs / "noise0.png"), 0)], bundle.preprocessing)
    diff = torch.as_tensor(x[PRE_LOGITS], dtype=torch.float64) - means.double()  # the older formula
    expected = torch.einsum("kd,de,ke->k", diff, precision.double(), diff).sqrt().min()
    row = next(r for r in _rows(out) if r["path"].endswith("noise0.png"))
    assert float(row["scope_score"]) == pytest.approx(float(expected), rel=1e-3)
    assert row["out_of_scope"] == str(float(expected) > 5.0)
    # Saved again by this release, it keeps its one layer and its scores.
    again = ModelBundle.load(bundle.save(tmp_path / "again.safetensors"))
    assert again.scope.layer_names == [PRE_LOGITS]
    assert again.scope.score(x) == pytest.approx(bundle.scope.score(x))
    document, _ = _file_parts(older)
    document["scope"]["threshold"] = -1  # a plain distance is never negative
    _, tensors = _file_parts(older)
    with pytest.raises(BreastvisionError, match="scope.threshold"):
        ModelBundle.load(_write(tmp_path / "negative.safetensors", document, tensors))


def test_training_fits_a_multi_layer_scope_thresholded_on_validation(image_tree, tmp_path: Path) -> None:
    """A trained run's scope: fitted at every default layer, its threshold the 97.5% quantile of the
    validation images' scores as ``predict`` computes them; ``refit_scope`` on the same run (the bench's
    ``--refit``) fits the same scope again on the same weights."""
    from breastvision.data.splits import Split
    from breastvision.serving.predict import load_predictor
    from breastvision.training.engine import train
    from breastvision.training.scope import refit_scope
    from test_training_engine import tiny_config

    source = image_tree(per_class=12)
    run = train(tiny_config(source, tmp_path / "run")).run_dir
    bundle = ModelBundle.load(run / "model.safetensors")
    assert bundle.scope.layer_names == ["layer1", "layer2", "layer3", PRE_LOGITS]
    split = Split.load(run / "split.json")
    val = sorted(k for k, part in split.assignment.items() if part == "val")
    predictor = load_predictor(run / "model.safetensors")
    scores = predictor.assess(torch.stack([predictor.preprocess(Image.open(source / k)) for k in val])).scores
    assert bundle.scope.n_validation == len(val)
    assert bundle.scope.threshold == pytest.approx(np.quantile(scores, QUANTILE), rel=1e-4)
    again = ModelBundle.load(refit_scope(run, tmp_path / "refit.safetensors"))
    assert again.scope.threshold == pytest.approx(bundle.scope.threshold, rel=1e-5)
    assert again.state_dict.keys() == bundle.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in bundle.state_dict.items())


def test_concurrent_workers_sharing_one_model_get_their_own_scope_scores(scoped: tuple[Path, Path]) -> None:
    """The web server's inference workers are threads sharing one model: each batch's scores are its
    own (the tap keeps features per thread), equal to scoring the images one at a time."""
    from breastvision.serving.predict import load_predictor
    from breastvision.serving.web import InferenceService

    model_file, inputs = scoped
    predictor = load_predictor(model_file)
    tensors = [predictor.preprocess(Image.open(p)) for p in sorted(inputs.glob("*.png"))] * 4
    alone = [predictor.assess(t[None]).scores[0] for t in tensors]
    service = InferenceService(predictor, max_batch=2, batch_wait_s=0.001, inference_workers=3)
    try:
        together = [f.result(timeout=60)[1] for f in [service.batcher.submit(t) for t in tensors]]
    finally:
        service.close()
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    assert len(set(np.round(alone, 3))) == 6  # six different images: a mix-up would show


# -- ONNX exports carry the score (serving.export, models.scope.ScopeScorer) ---------------------------


@pytest.fixture(scope="module")
def scoped_onnx(scoped: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """The scoped model file's ONNX export (the default opset, the dynamo exporter) and its result."""
    from breastvision.serving.export import export_onnx

    return export_onnx(scoped[0], tmp_path_factory.mktemp("onnx") / "scoped.onnx")


def _constant_image(path: Path, value: int) -> Path:
    Image.new("RGB", (64, 64), (value, value, value)).save(path)
    return path


def test_onnx_export_of_a_scoped_file_carries_the_score_and_the_scope_metadata(scoped, scoped_onnx) -> None:
    import onnx
    import onnxruntime as ort

    bundle = ModelBundle.load(scoped[0])
    session = ort.InferenceSession(str(scoped_onnx.path), providers=["CPUExecutionProvider"])
    outputs = [(o.name, o.type) for o in session.get_outputs()]
    assert outputs == [("probabilities", "tensor(float)"), ("scope_score", "tensor(double)")]
    probs, scores = session.run(None, {"image": np.zeros((3, 3, 64, 64), np.float32)})
    assert probs.shape == (3, 3) and scores.shape == (3,)  # the batch axis is dynamic
    props = {p.key: json.loads(p.value) for p in onnx.load(str(scoped_onnx.path)).metadata_props}
    assert "scope" not in props["breastvision"]  # releases before the output read it as unscoped
    assert props["breastvision_onnx"]["scope_output"] == "scope_score"
    assert props["breastvision_scope"] == bundle.scope.metadata()
    assert [layer["name"] for layer in props["breastvision_scope"]["layers"]] == bundle.scope.layer_names
    assert 0 <= scoped_onnx.scope_diff <= 1e-4 and scoped_onnx.max_abs_diff <= 1e-4


def test_onnx_predictor_scores_and_flags_as_the_model_file(scoped, scoped_onnx, tmp_path: Path) -> None:
    """The same probabilities, scope scores and flags as PyTorch on in-domain grey images, colour noise
    and two constant images (far outside), with and without TTA (the score: the image as given)."""
    from breastvision.serving.predict import OnnxPredictor, TorchPredictor, load_predictor

    model_file, inputs = scoped
    torch_predictor, onnx_predictor = load_predictor(model_file), load_predictor(scoped_onnx.path)
    assert isinstance(torch_predictor, TorchPredictor) and isinstance(onnx_predictor, OnnxPredictor)
    paths = [*sorted(inputs.glob("*.png")), _constant_image(tmp_path / "white.png", 255),
             _constant_image(tmp_path / "black.png", 0)]
    batch = torch.stack([torch_predictor.prepare_file(p) for p in paths])
    flags = {}
    for tta in (False, "hflip"):
        expected, actual = torch_predictor.assess(batch, tta), onnx_predictor.assess(batch, tta)
        np.testing.assert_allclose(actual.probs, expected.probs, atol=1e-5)
        # Scores are in validation standard deviations; this scope, fitted on nearly flat grey images,
        # turns the runtimes' float32 rounding of the features into up to ~3e-4 of one in domain.
        np.testing.assert_allclose(actual.scores, expected.scores, rtol=1e-4, atol=1e-3)
        for predictor, assessment in ((torch_predictor, expected), (onnx_predictor, actual)):
            judged = [predictor.judge(p.name, p, row, score).out_of_scope
                      for p, row, score in zip(paths, assessment.probs, assessment.scores, strict=True)]
            flags.setdefault(tta, []).append(judged)
    np.testing.assert_allclose(onnx_predictor.assess(batch, "hflip").scores,
                               onnx_predictor.assess(batch).scores, rtol=1e-9)
    assert flags[False][0] == flags[False][1] == flags["hflip"][1]
    assert flags[False][1] == [False] * 3 + [True] * 3 + [True, True], flags  # grey, noise, constants
    assert onnx_predictor.judge.scope_threshold == ModelBundle.load(model_file).scope.threshold
    assert onnx_predictor.card()["scope"] == ModelBundle.load(model_file).scope.metadata()


def test_predict_with_a_scoped_onnx_file_writes_the_scope_columns(scoped, scoped_onnx, tmp_path) -> None:
    model_file, inputs = scoped
    rows = {}
    for name, model in (("torch", model_file), ("onnx", scoped_onnx.path)):
        assert main(["predict", str(model), str(inputs), "--out", str(tmp_path / f"{name}.csv")]) == 0
        rows[name] = {Path(r["path"]).name: r for r in _rows(tmp_path / f"{name}.csv")}
    assert list(next(iter(rows["onnx"].values())))[-3:] == ["out_of_scope", "scope_score", "skipped"]
    assert {k: r["out_of_scope"] for k, r in rows["onnx"].items()} == \
        {**{f"grey{i}.png": "False" for i in range(3)}, **{f"noise{i}.png": "True" for i in range(3)}}
    for key, row in rows["onnx"].items():
        expected = float(rows["torch"][key]["scope_score"])
        assert float(row["scope_score"]) == pytest.approx(expected, rel=1e-4, abs=1e-3)


def test_export_without_a_scope_is_unchanged_and_a_mismatched_file_is_refused(
        make_model_file, scoped, scoped_onnx, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    from breastvision.serving.export import export_onnx
    from breastvision.serving.predict import load_predictor

    plain = export_onnx(make_model_file("resnet18"), tmp_path / "plain.onnx", opset=17)
    proto = onnx.load(str(plain.path))
    assert [o.name for o in proto.graph.output] == ["probabilities"] and plain.scope_diff is None
    assert {p.key for p in proto.metadata_props} == {"breastvision", "breastvision_onnx"}
    # What the previous release exported for any file: no score output, no scope metadata.
    assert load_predictor(plain.path).info.scope is None
    # The scope's description without its output, and the output without its description.
    scope_entry = next(p for p in onnx.load(str(scoped_onnx.path)).metadata_props
                       if p.key == "breastvision_scope")
    unscored = onnx.load(str(plain.path))
    unscored.metadata_props.add(key=scope_entry.key, value=scope_entry.value)
    undescribed = onnx.load(str(scoped_onnx.path))
    kept = [p for p in undescribed.metadata_props if p.key != "breastvision_scope"]
    del undescribed.metadata_props[:]
    undescribed.metadata_props.extend(kept)
    for proto, message in ((unscored, "needs a second output scope_score"),
                           (undescribed, "output scope_score without the scope metadata")):
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        out = tmp_path / "p.csv"
        assert main(["predict", str(tmp_path / "bad.onnx"), str(scoped[1]), "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error, error


def test_export_refuses_a_graph_whose_score_differs_from_the_scopes(scoped, monkeypatch, tmp_path) -> None:
    """The check compares the graph's scores with ``Scope.score`` of PyTorch's features (opset 17, the
    TorchScript exporter, here): a scope that scored otherwise is a one-line error."""
    from breastvision.serving.export import export_onnx

    result = export_onnx(scoped[0], tmp_path / "ok.onnx", opset=17)
    assert result.scope_diff is not None and result.scope_diff <= 1e-4
    score = Scope.score
    monkeypatch.setattr(Scope, "score", lambda self, features: score(self, features) * 1.001)
    with pytest.raises(BreastvisionError, match=r"scores disagree by 9\.99e-04 \(> 0\.0001, relative\)"):
        export_onnx(scoped[0], tmp_path / "off.onnx", opset=17)


def test_auto_back_end_serves_a_scoped_model_on_onnxruntime(scoped, scoped_onnx, monkeypatch) -> None:
    """``serve``'s default back-end exports a scoped model too, and the answers carry its flag."""
    import shutil

    from breastvision.serving import web
    from breastvision.serving.predict import OnnxPredictor

    model_file, inputs = scoped

    def export(model: Path, out: Path) -> Path:
        # The fixture's export of the same file (the same call), not a second one in a spawned process.
        assert model == model_file
        return Path(shutil.copy(scoped_onnx.path, out))

    monkeypatch.setattr(web, "_export_in_subprocess", export)
    predictor, explain_file = web._predictor(model_file, "auto")
    assert isinstance(predictor, OnnxPredictor) and explain_file == model_file
    service = web.InferenceService(predictor)
    try:
        with (inputs / "noise0.png").open("rb") as noise, (inputs / "grey0.png").open("rb") as grey:
            answers = [service.predict(noise), service.predict(grey)]
    finally:
        service.close()
    assert [a["out_of_scope"] for a in answers] == [True, False]
    assert service.card["source"]["backend"] == "onnxruntime"
    assert service.card["scope"]["threshold"] == ModelBundle.load(model_file).scope.threshold


def test_scored_without_a_scope_is_the_logits_and_no_scores(make_model_file, tmp_path: Path) -> None:
    """``Predictor.scored`` of a file without a scope, on both back-ends: its logits, no scores."""
    from breastvision.serving.export import export_onnx
    from breastvision.serving.predict import load_predictor

    model_file = make_model_file("resnet18")
    onnx_file = export_onnx(model_file, tmp_path / "plain.onnx", opset=17).path
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for predictor in (load_predictor(model_file), load_predictor(onnx_file)):
        logits, scores = predictor.scored(x)
        assert scores is None and logits.shape == (2, 3)
        torch.testing.assert_close(logits, predictor.logits(x))
