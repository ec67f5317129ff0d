"""``--device``: one option, resolved by ``devices.resolve_device``, on every command that runs a
model; a device the machine lacks is a one-line error before any work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from breastvision.cli import main
from breastvision.devices import resolve_device
from breastvision.errors import BreastvisionError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def test_auto_and_cpu_resolve() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BreastvisionError, match="unknown --device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(BreastvisionError, match="not supported"):
        resolve_device("meta")


@no_cuda
@pytest.mark.parametrize("command", ["predict", "predict-slide", "evaluate", "serve", "export"])
def test_cuda_without_a_gpu_is_one_line(command: str, make_model_file, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = str(make_model_file("resnet18"))
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    args = {
        "predict": ["predict", model, str(image)],
        "predict-slide": ["predict-slide", model, str(image), "--out", str(tmp_path / "s")],
        "evaluate": ["evaluate", model, str(tmp_path), "--out", str(tmp_path / "e")],
        "serve": ["serve", model, "--port", "1"],
        "export": ["export", model, "--onnx", str(tmp_path / "m.onnx")],
    }[command]
    assert main([*args, "--device", "cuda"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--device cuda: no CUDA GPU is available" in error
    assert not (tmp_path / "m.onnx").exists()
