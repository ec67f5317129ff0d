"""The model file: save → load → build_model gives the same model; bad files are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model, data_config, list_models


@pytest.mark.parametrize(
    ("name", "kwargs", "side"),
    [
        ("densenet121_se", {"drop_rate": 0.1}, 64),
        ("fusion", {"cnn": "resnet18", "vit": "vit_tiny", "head_hidden": (64, 32)}, 224),
    ],
)
def test_round_trip_gives_identical_outputs(tmp_path, name, kwargs, side):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, **kwargs).eval()
    bundle = ModelBundle(
        model.architecture,
        ["benign", "malignant"],
        model.state_dict(),
        model_kwargs=model.model_kwargs,
        preprocessing=Preprocessing(input_size=side, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        lineage=[{"stage": "imagenet", "weights": model.weights_origin}],
        metrics={"val": {"accuracy": 0.75}},
    )
    loaded = ModelBundle.load(bundle.save(tmp_path / "model.safetensors"))
    # JSON has no tuples: compare as JSON.
    assert json.loads(json.dumps(loaded.metadata())) == json.loads(json.dumps(bundle.metadata()))
    rebuilt = loaded.build_model()
    assert not rebuilt.training
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    bundle = ModelBundle("densenet121", ["a", "b"], create_model("resnet18", num_classes=2).state_dict())
    loaded = ModelBundle.load(bundle.save(tmp_path / "model.safetensors"))
    with pytest.raises(BreastvisionError, match="do not match architecture 'densenet121'"):
        loaded.build_model()


def test_unknown_architecture_in_a_model_file(tmp_path):
    bundle = ModelBundle("resnet50x", ["a", "b"], {"w": torch.zeros(1)})
    with pytest.raises(BreastvisionError, match="unknown model 'resnet50x'"):
        ModelBundle.load(bundle.save(tmp_path / "model.safetensors")).build_model()


def test_files_that_are_not_model_files(tmp_path):
    with pytest.raises(BreastvisionError, match="model file not found"):
        ModelBundle.load(tmp_path / "absent.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(BreastvisionError, match="without breastvision metadata"):
        ModelBundle.load(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 16)
    with pytest.raises(BreastvisionError, match="not a breastvision model file"):
        ModelBundle.load(junk)


def test_a_file_that_would_not_load_is_not_written(tmp_path):
    bundle = ModelBundle("resnet18", ["tumour", "tumour"], {"w": torch.zeros(1)})
    with pytest.raises(BreastvisionError, match="would not load: class_names: class names repeat: tumour"):
        bundle.save(tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("name", list_models())
def test_every_architecture_takes_the_input_size_check(name):
    """build_model's input-size check runs the architecture on the meta device: each registered one
    must run there at its own input size (a data-dependent forward would refuse every file), and
    refuse a size it cannot take."""
    with torch.device("meta"):
        side = int(data_config(create_model(name, num_classes=2))["input_size"][-1])
    bundle = ModelBundle(name, ["a", "b"], {}, preprocessing=Preprocessing(input_size=side))
    bundle._check_input_size(lambda: create_model(name, num_classes=2), "")
    if name.startswith(("vit", "fusion")):  # fixed patch grids
        bundle.preprocessing = Preprocessing(input_size=side + 16)
        with pytest.raises(BreastvisionError, match=f"cannot take the file's input_size {side + 16}"):
            bundle._check_input_size(lambda: create_model(name, num_classes=2), "")
