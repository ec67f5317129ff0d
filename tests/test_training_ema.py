"""The weights' moving average (``train.ema_decay``): what is validated is what is saved, and the
trained weights go on learning underneath."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from breastvision.models.weights import load_torch_file
from breastvision.training.engine import train
from breastvision.training.loop import make_ema
from test_training_engine import history, tiny_config, weights


def test_the_model_file_holds_the_average_and_the_checkpoint_both(image_tree, tmp_path: Path) -> None:
    # One epoch, so the best epoch is the last and the file must hold its average.
    run = train(tiny_config(image_tree(), tmp_path / "ema", "train.epochs=1", "train.ema_decay=0.5")).run_dir
    last = load_torch_file(run / "checkpoints" / "last.ckpt", "checkpoint")
    averaged = [v for k, v in last["ema"].items() if k.startswith("module.")]
    assert int(last["ema"]["n_averaged"]) > 1  # one update per step, several steps
    saved = weights(run)
    moved = [k for k, v in saved.items() if k in last["model"] and not torch.equal(v, last["model"][k])]
    # The trained weights (last.ckpt's model) went on past the average the file holds ...
    assert any(k.endswith("fc.weight") for k in moved)
    # ... and each weight the file holds differently is one of the average's.
    assert all(any(saved[k].shape == a.shape and torch.equal(saved[k], a) for a in averaged) for k in moved)
    frozen = [k for k in saved if k.startswith("conv1") or k.startswith("layer1")]
    assert frozen and all(torch.equal(saved[k], last["model"][k]) for k in frozen)


def test_without_decay_the_run_keeps_no_average(image_tree, tmp_path: Path) -> None:
    run = train(tiny_config(image_tree(), tmp_path / "plain", "train.epochs=1")).run_dir
    assert "ema" not in load_torch_file(run / "checkpoints" / "last.ckpt", "checkpoint")
    assert make_ema(nn.Linear(2, 2), 0.0) is None


def test_the_average_lags_the_weights_by_its_decay() -> None:
    layer = nn.Linear(3, 1)
    ema = make_ema(layer, 0.75)
    start = layer.weight.detach().clone()
    ema.update_parameters(layer)  # the first update copies
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update_parameters(layer)
    assert torch.allclose(ema.module.weight, start + 0.25)


def test_resume_with_an_average_continues_exactly(image_tree, tmp_path: Path) -> None:
    # The validation loss is the average's, so equal histories need the average resumed too.
    source, on = image_tree(), "train.ema_decay=0.5"
    straight = train(tiny_config(source, tmp_path / "straight", "train.epochs=3", on)).run_dir
    first = train(tiny_config(source, tmp_path / "split", "train.epochs=1", on)).run_dir
    resumed = train(tiny_config(source, tmp_path / "split", "train.epochs=3", on),
                    resume=first / "checkpoints" / "last.ckpt").run_dir
    for a, b in zip(history(straight), history(resumed), strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    w_resumed = weights(resumed)
    assert all(torch.allclose(v, w_resumed[k], atol=1e-6) for k, v in weights(straight).items())
