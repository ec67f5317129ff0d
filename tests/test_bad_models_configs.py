"""The bad-input corpus for model files, checkpoints and configs, generated here.

Every bad model file goes through ``predict``, ``evaluate``, ``export`` and the web app factory;
every bad config and checkpoint through ``train``. Each must end in one line on stderr naming the
problem and exit status 2: never a traceback, never a silently different result.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper
from PIL import Image

from breastvision.cli import main
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model
from breastvision.serving.predict import ONNX_METADATA_KEY, OnnxPredictor, load_predictor
from breastvision.serving.web import create_app

CLASSES = ["benign", "malignant", "normal"]
SIDE = 32


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    """Run the CLI, assert it failed the user-error way (status 2, one stderr line), return the line."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("breastvision: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# -- generated model files ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 3-class ResNet-18 model file at 32 px inside a run folder with its checkpoints."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=len(CLASSES))
    path = ModelBundle(
        "resnet18", CLASSES, model.state_dict(), model_kwargs=model.model_kwargs,
        preprocessing=Preprocessing(input_size=SIDE),
        lineage=[{"stage": "test", "weights": "random init"}],
    ).save(run / "model.safetensors")
    (run / "checkpoints").mkdir()
    torch.save({"model": model.state_dict(), "epoch": 2}, run / "checkpoints" / "best.ckpt")
    return path


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["breastvision"])


def _rewrite(good: Path, out: Path, change: Callable[[dict], object], cut: int = 0) -> Path:
    """``good`` with its metadata changed by ``change`` (which edits in place, or returns the text)
    and its weights zero (:func:`_zero_weights_copy`), less its last ``cut`` bytes."""
    meta = _metadata(good)
    text = change(meta)
    return _zero_weights_copy(good, out, {"breastvision": text if text else json.dumps(meta)}, cut)


def _zero_weights_copy(good: Path, out: Path, metadata: dict[str, str] | None, cut: int = 0) -> Path:
    """A safetensors file with ``good``'s tensor names, shapes and offsets, ``metadata`` as its
    metadata (``None``: none) and every weight zero, less its last ``cut`` bytes. The zeros are a
    sparse hole: the corpus's files are about their metadata, and real copies of the weights
    would be a gigabyte and a half on disk."""
    with good.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    data_size = max(entry["data_offsets"][1] for entry in header.values())
    if metadata is not None:
        header["__metadata__"] = metadata
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes
    with out.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        handle.truncate(8 + len(encoded) + data_size - cut)
    return out


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def change(meta: dict) -> None:
        node = meta
        for key in keys[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value

    return change


_DELETE = object()


def _stain(target: dict) -> dict:
    params = {"io": 240.0, "alpha": 1.0, "beta": 0.15, "min_tissue_fraction": 0.02}
    return {"method": "macenko", "version": 1, "params": params, "target": target, "reference": None}


def _edited(*keys_and_value) -> Callable[[Path, Path], Path]:
    """Maker of the good file with one metadata value set (``_DELETE``: removed)."""
    return lambda good, folder: _rewrite(good, folder / "m.safetensors", _set(*keys_and_value))


def _merged(**changes: object) -> Callable[[Path, Path], Path]:
    """Maker of the good file with several top-level metadata values replaced."""
    return lambda good, folder: _rewrite(good, folder / "m.safetensors", lambda meta: meta.update(changes))


def _text(text: str) -> Callable[[Path, Path], Path]:
    """Maker of the good file with its metadata replaced by ``text``."""
    return lambda good, folder: _rewrite(good, folder / "m.safetensors", lambda meta: text)


def _points(**thresholds: float) -> dict:
    return {"positive_class": CLASSES[1], "target_sensitivity": 0.95, "thresholds": thresholds}


_BAD_STAIN = _stain({"stain_matrix": [[0.6, 0.2], [0.7, 0.9]], "max_concentrations": [1.9, 1.0]})

#: name -> (how to make it from the good file and a folder, a regex the one-line error must match)
SAFETENSORS_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "zero_bytes": (lambda g, d: _bytes(d / "m.safetensors", b""), r"empty \(0 bytes\)"),
    "truncated": (lambda g, d: _rewrite(g, d / "m.safetensors", lambda meta: None, cut=1000), "truncated"),
    "png_renamed": (lambda g, d: _bytes(d / "m.safetensors", _png_bytes()), "not a safetensors file"),
    "random_bytes": (lambda g, d: _bytes(d / "m.safetensors", os.urandom(4096)), "not a breastvision model"),
    "missing": (lambda g, d: d / "absent.safetensors", "model file not found"),
    "run_folder": (lambda g, d: g.parent, r"is a run folder; its model file is .*model\.safetensors"),
    "empty_folder": (lambda g, d: d, "is a folder, not a model file"),
    "best_ckpt": (lambda g, d: g.parent / "checkpoints" / "best.ckpt",
                  r"training checkpoint, not a model file; its run's model file is .*model\.safetensors"),
    "ckpt_renamed": (lambda g, d: _copy(g.parent / "checkpoints" / "best.ckpt", d / "m.safetensors"),
                     "training checkpoint, not a model file"),
    "pth_weights": (lambda g, d: _copy(g.parent / "checkpoints" / "best.ckpt", d / "w.pth"),
                    "is a PyTorch weights file .*, not a model file"),
    "no_metadata": (lambda g, d: _zero_weights_copy(g, d / "m.safetensors", None),
                    "without breastvision metadata"),
    "bad_json": (_text("{not json"), "metadata is not JSON"),
    "json_list": (_text("[1, 2]"), "not a JSON object"),
    "no_architecture": (_edited("architecture", _DELETE), "architecture: Field required"),
    "unknown_architecture": (_edited("architecture", "resnet50x"), "unknown model 'resnet50x'"),
    "newer_format": (_edited("format_version", 2), "format version 2"),
    "no_preprocessing": (_edited("preprocessing", _DELETE), "preprocessing: Field required"),
    "no_mean": (_edited("preprocessing", "mean", _DELETE), "preprocessing: lacks mean"),
    "input_size_string": (_edited("preprocessing", "input_size", "32"), "input_size: .*valid integer"),
    "input_size_zero": (_edited("preprocessing", "input_size", 0), "input_size: .*equal to 16"),
    "input_size_60000": (_edited("preprocessing", "input_size", 60000), "input_size: .*equal to 4096"),
    "std_zero": (_edited("preprocessing", "std", [0.2, 0, 0.2]), r"preprocessing\.std\.1: .*greater than 0"),
    "one_value_mean": (_edited("preprocessing", "mean", [0.5]), "mean: needs 3 values, one per RGB channel"),
    "nan_mean": (_edited("preprocessing", "mean", [0.5, "NaN", 0.5]), r"mean\.1: .*finite number"),
    "resize_below_input": (_edited("preprocessing", "resize", 16), "resize 16 is smaller than"),
    "unknown_preprocessing_key": (_edited("preprocessing", "crop", 1), "crop: unknown key"),
    "stain_wrong_shape": (_edited("preprocessing", "stain", _BAD_STAIN), r"stain_matrix must be \(3, 2\)"),
    "stain_not_finite": (_edited("preprocessing", "stain", _stain(
        {"stain_matrix": [[0.6, 0.2], [0.7, 0.9], [0.3, float("inf")]], "max_concentrations": [1.9, 1.0]})),
        "got NaN or infinity"),
    "stain_unknown_method": (_edited("preprocessing", "stain", {"method": "vahadane"}),
                             "unknown stain normalisation method 'vahadane'"),
    "no_class_names": (_edited("class_names", []), "class_names: List should have at least 2 items"),
    "repeated_class_names": (_edited("class_names", ["a", "b", "a"]), "class names repeat: a"),
    "class_names_not_strings": (_edited("class_names", [0, 1, 2]), r"class_names\.0: .*valid string"),
    "fewer_classes_than_weights": (_edited("class_names", ["a", "b"]),
                                   r"do not match architecture 'resnet18' with 2 classes \(wrong shape"),
    "weights_of_another_model": (_edited("architecture", "googlenet"),
                                 r"weights do not match architecture 'googlenet'.*unexpected .* missing"),
    "unknown_model_kwarg": (_edited("model_kwargs", {"bogus": 1}), "bad arguments for model 'resnet18'"),
    "bad_model_kwarg_value": (_merged(architecture="densenet121_se", model_kwargs={"drop_rate": "high"}),
                              r"model_kwargs .* cannot build 'densenet121_se' \(TypeError"),
    "vit_at_wrong_size": (lambda g, d: _vit_file(d / "m.safetensors"), "cannot take .* input_size 32"),
    "temperature_zero": (_edited("calibration", {"temperature": 0}),
                         r"calibration\.temperature: .*greater than 0"),
    "temperature_infinite": (_edited("calibration", {"temperature": float("inf")}),
                             r"calibration\.temperature: .*finite number"),
    "threshold_above_one": (_edited("operating_points", _points(youden=1.5)),
                            r"operating_points\.thresholds\.youden: .*less than or equal to 1"),
    "operating_points_of_another_class": (_edited("operating_points", {**_points(youden=0.4),
                                                                       "positive_class": "cancer"}),
                                          "positive_class 'cancer' is not one of the class names"),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _copy(source: Path, path: Path) -> Path:
    """``source`` under another name: a hard link, as the content is the same (no second copy on disk)."""
    os.link(source, path)
    return path


def _png_bytes() -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _vit_file(path: Path) -> Path:
    model = create_model("vit_tiny", num_classes=2)
    return ModelBundle("vit_tiny", ["a", "b"], model.state_dict(), model_kwargs=model.model_kwargs,
                       preprocessing=Preprocessing(input_size=SIDE)).save(path)


# -- generated ONNX files -----------------------------------------------------------------------


def _onnx_file(path: Path, metadata: str | None, side: int = SIDE, outputs: int = len(CLASSES)) -> Path:
    """A tiny ONNX graph, image [N, 3, side, side] -> average colour -> softmax over ``outputs``
    (a 1×1 convolution picks the count), with ``metadata`` as the breastvision key."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [outputs, 3, 1, 1], np.ones(outputs * 3).tolist())
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Conv", ["pooled", "w"], ["mixed"]),
         helper.make_node("Flatten", ["mixed"], ["flat"]),
         helper.make_node("Softmax", ["flat"], ["probabilities"], axis=1)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[weight],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, metadata
    onnx.save(proto, str(path))
    return path


#: name -> (how to make it from the good model file's metadata and a folder, the error's words)
ONNX_CASES: dict[str, tuple[Callable[[dict, Path], Path], str]] = {
    "onnx_wrong_output_shape": (lambda m, d: _onnx_file(d / "m.onnx", json.dumps(m), outputs=2),
                                r"output \['batch', 2\], expected \[batch, 3\] for its 3 class names"),
    "onnx_wrong_input_size": (lambda m, d: _onnx_file(d / "m.onnx", json.dumps(m), side=48),
                              r"expected one \[batch, 3, 32, 32\]"),
    "onnx_without_metadata": (lambda m, d: _onnx_file(d / "m.onnx", None), "has no breastvision metadata"),
    "onnx_bad_json": (lambda m, d: _onnx_file(d / "m.onnx", "{oops"), "metadata is not JSON"),
    "onnx_bad_metadata": (lambda m, d: _onnx_file(d / "m.onnx", json.dumps({**m, "class_names": "abc"})),
                          "class_names: Input should be a valid list"),
    "onnx_garbage": (lambda m, d: _bytes(d / "m.onnx", b"\x08\x07garbage" * 50), "not a usable ONNX model"),
    "onnx_zero_bytes": (lambda m, d: _bytes(d / "m.onnx", b""), r"empty \(0 bytes\)"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-per-folder tree of six tiny images: what predict and evaluate are pointed at."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("benign", "malignant"):
        (root / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def corpus(good: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    made = {}
    for name, (make, expected) in SAFETENSORS_CASES.items():
        made[name] = (make(good, tmp_path_factory.mktemp(name)), expected)
    for name, (make, expected) in ONNX_CASES.items():
        made[name] = (make(_metadata(good), tmp_path_factory.mktemp(name)), expected)
    return made


ALL_CASES = [*SAFETENSORS_CASES, *ONNX_CASES]


def test_controls_the_good_files_work(good: Path, images: Path, tmp_path: Path, capsys) -> None:
    """The corpus's starting points are valid, so each case fails for its own defect alone."""
    assert main(["predict", str(good), str(images), "--out", str(tmp_path / "p.csv")]) == 0
    # The edited files' zero weights are not a defect: unedited, such a file predicts too.
    unedited = _rewrite(good, tmp_path / "zero.safetensors", lambda meta: None)
    assert main(["predict", str(unedited), str(images), "--out", str(tmp_path / "z.csv")]) == 0
    tiny = OnnxPredictor(_onnx_file(tmp_path / "ok.onnx", json.dumps(_metadata(good))))
    assert tiny.probabilities(torch.zeros(2, 3, SIDE, SIDE)).shape == (2, 3)
    stain = _stain({"stain_matrix": [[0.6, 0.2], [0.7, 0.9], [0.3, 0.4]], "max_concentrations": [1.9, 1.0]})
    stained = ModelBundle.load(_edited("preprocessing", "stain", stain)(good, tmp_path))
    assert stained.preprocessing.stain == stain


@pytest.mark.parametrize("case", ALL_CASES)
def test_predict_refuses_in_one_line(case, corpus, images, capsys) -> None:
    path, expected = corpus[case]
    assert _search(expected, _cli_error(capsys, "predict", path, images))


@pytest.mark.parametrize("case", ALL_CASES)
def test_evaluate_refuses_in_one_line(case, corpus, images, tmp_path, capsys) -> None:
    path, expected = corpus[case]
    line = _cli_error(capsys, "evaluate", path, images, "--out", tmp_path / "report", "--n-resamples", 0)
    assert _search(expected, line)  # evaluate runs predict's predictor: ONNX exports too
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("case", ALL_CASES)
def test_export_refuses_in_one_line(case, corpus, tmp_path, capsys) -> None:
    path, expected = corpus[case]
    line = _cli_error(capsys, "export", path, "--onnx", tmp_path / "out.onnx")
    assert _search(_for_safetensors_only(case, path, expected), line)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("case", ALL_CASES)
def test_the_web_app_factory_refuses(case, corpus) -> None:
    path, expected = corpus[case]
    with pytest.raises(BreastvisionError) as caught:
        create_app(path)
    assert "\n" not in str(caught.value) and _search(expected, str(caught.value))


def _for_safetensors_only(case: str, path: Path, expected: str) -> str:
    """export takes the .safetensors file: given an ONNX one, that is what it says."""
    return "is an ONNX export" if case.startswith("onnx") and case != "onnx_zero_bytes" else expected


def _search(pattern: str, text: str) -> bool:
    import re

    assert re.search(pattern, text), f"{pattern!r} not in {text!r}"
    return True


def test_errors_name_the_file(corpus) -> None:
    for case in ("truncated", "std_zero", "fewer_classes_than_weights", "onnx_wrong_output_shape"):
        path, _ = corpus[case]
        with pytest.raises(BreastvisionError, match=str(path).replace("\\", "\\\\")):
            load_predictor(path)


# -- the model card -----------------------------------------------------------------------------


def test_the_model_card_shows_file_names_and_hashes_not_server_folders(good: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    weights, hub = "/srv/secret/weights/densenet121-a639ec97.pth", "/root/.cache/hf/snap"
    lineage = [
        {"stage": "initial weights", "weights": {"backbone": f"file: {weights} (sha256 abc123)"}},
        {"stage": "busi", "data": "folder (/srv/secret/data/manifest.csv)",
         "split": {"file": "/srv/secret/runs/busi/split.json"},
         "checkpoint": "/srv/secret/runs/busi/model.safetensors",
         "weights": {"vit": f"imagenet: timm timm/vit_tiny ({hub}/my model.safetensors (sha256 def))"}},
    ]
    path = _rewrite(good, tmp_path / "m.safetensors", _set("lineage", lineage))
    card = TestClient(create_app(path)).get("/api/model").json()
    text = json.dumps(card)
    assert "/srv/" not in text and "/root/" not in text and str(tmp_path) not in text
    first, second = card["lineage"]
    assert first["weights"]["backbone"] == "file: densenet121-a639ec97.pth (sha256 abc123)"
    assert second["checkpoint"] == "model.safetensors" and second["split"]["file"] == "split.json"
    assert second["data"] == "folder (manifest.csv)"
    assert second["weights"]["vit"] == "imagenet: timm timm/vit_tiny (my model.safetensors (sha256 def))"
    assert card["source"]["file"] == "m.safetensors" and len(card["source"]["sha256"]) == 64
    # The file itself keeps the full record: only what is shown to others is cut.
    assert ModelBundle.load(path).lineage == lineage


# -- configs and checkpoints through ``train`` --------------------------------------------------


@pytest.fixture()
def config_dir(tmp_path: Path, images: Path) -> Path:
    """A valid config (``ok.yaml``) beside which the bad ones are written."""
    config = {"name": "t", "output_dir": str(tmp_path / "run"),
              "data": {"source": str(images), "input_size": SIDE},
              "model": {"name": "resnet18"}, "train": {"epochs": 1, "batch_size": 4, "accelerator": "cpu"}}
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


CONFIG_CASES: dict[str, tuple[str, list[str], str]] = {
    # name: (YAML text, or "" to use ok.yaml; overrides; the error's words)
    "yaml_syntax": ("data: {source: [busi\n", [], "is not valid YAML: .* at line 2, column 1"),
    "not_a_mapping": ("- just\n- a list\n", [], "must be a mapping of sections"),
    "unknown_key": ("", ["train.epoch=3"], "train.epoch: unknown key"),
    "unknown_section": ("trian: {epochs: 2}\n", [], "trian: unknown key"),
    "wrong_type": ("", ["train.epochs=many"], "train.epochs: Input should be a valid integer"),
    "section_as_value": ("data: busi\n", [], "data(: .*dictionary|' is a value, not a section)"),
    "unknown_model": ("", ["model.name=resnet50x"], "model.name: unknown model 'resnet50x'"),
    "input_size_too_small": ("", ["data.input_size=8"], "data.input_size: .*greater than or equal to 16"),
    "std_zero": ("", ["data.std=[0.2, 0, 0.2]"], r"data.std.1: Input should be greater than 0"),
    "one_value_mean": ("", ["data.mean=[0.5]"], "data.mean: needs 3 values"),
    "override_without_value": ("", ["a.b"], "override 'a.b' is not of the form key=value"),
    "override_into_a_value": ("", ["train.epochs.x=1"], "'epochs' is a value, not a section"),
    "extends_missing": ("extends: nowhere.yaml\n", [], "config file not found: .*nowhere.yaml"),
    "missing_file": (None, [], "config file not found"),
}


@pytest.mark.parametrize("command", ["train", "crossval"])
@pytest.mark.parametrize("case", CONFIG_CASES)
def test_training_refuses_a_bad_config_in_one_line(case, command, config_dir: Path, capsys) -> None:
    text, overrides, expected = CONFIG_CASES[case]
    path = config_dir / ("ok.yaml" if text == "" else f"{case}.yaml")
    if text:
        path.write_text(text)
    line = _cli_error(capsys, command, path, *(f"--set={o}" for o in overrides))
    assert _search(expected, line)
    assert not (config_dir / "run").exists()


def _evil_checkpoint(path: Path) -> Path:
    class Payload:  # unpickling this would call os.system; weights-only loading must refuse it
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"model": Payload()}, path)
    return path


def _truncated_checkpoint(path: Path) -> Path:
    torch.save({"model": {}, "epoch": 1}, path)
    data = path.read_bytes()
    return _bytes(path, data[: len(data) // 2])


CHECKPOINT_CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "best_ckpt": (lambda g, d: g.parent / "checkpoints" / "best.ckpt",
                  r"best-epoch checkpoint \(model weights of epoch 2 only.*resume from .*last\.ckpt"),
    "malicious_pickle": (lambda g, d: _evil_checkpoint(d / "last.ckpt"),
                         "weights-only loading refuses .*GLOBAL .*system"),
    "truncated": (lambda g, d: _truncated_checkpoint(d / "last.ckpt"), "truncated or not a PyTorch file"),
    "zero_bytes": (lambda g, d: _bytes(d / "last.ckpt", b""), "truncated or not a PyTorch file"),
    "not_a_dict": (lambda g, d: _saved([1, 2, 3], d / "last.ckpt"), "not a breastvision training checkpoint"),
    "foreign_dict": (lambda g, d: _saved({"model": {}, "epoch": 1, "optimizer": {}}, d / "last.ckpt"),
                     "lacks scheduler, history, best, config"),
    "wrong_types": (lambda g, d: _saved({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": "1",
                                         "history": [], "best": None, "config": []}, d / "last.ckpt"),
                    r"not a breastvision checkpoint \(epoch, config of the wrong type\)"),
    "model_file": (lambda g, d: g, "is a model file, not a training checkpoint"),
    "missing": (lambda g, d: d / "absent.ckpt", "checkpoint not found"),
}


def _saved(value: object, path: Path) -> Path:
    torch.save(value, path)
    return path


@pytest.mark.parametrize("case", ["malicious_pickle", "truncated", "zero_bytes", "not_a_dict"])
def test_pretrained_weights_files_are_read_safely(case, good: Path, tmp_path: Path) -> None:
    """``model.pretrained`` files go through the same weights-only reader, with the same errors."""
    from breastvision.models.weights import read_state_dict

    make, _ = CHECKPOINT_CASES[case]
    with pytest.raises(BreastvisionError) as caught:
        read_state_dict(make(good, tmp_path).rename(tmp_path / "weights.pth"))
    assert "\n" not in str(caught.value) and "weights.pth" in str(caught.value)


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_train_refuses_a_bad_checkpoint_in_one_line(case, good: Path, config_dir: Path, capsys) -> None:
    make, expected = CHECKPOINT_CASES[case]
    folder = config_dir / "ckpt"
    folder.mkdir()
    checkpoint = make(good, folder)
    line = _cli_error(capsys, "train", config_dir / "ok.yaml", "--resume", checkpoint,
                      "--out", config_dir / "run")
    assert _search(expected, line)
    assert not (config_dir / "run").exists()
