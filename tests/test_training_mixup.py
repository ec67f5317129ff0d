"""Mixup (``train.mixup_alpha``): the blend, the mixed loss, and that training really uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from breastvision.training.engine import train
from breastvision.training.loop import Mixup, _losses
from test_training_engine import history, tiny_config


def test_off_at_alpha_zero_and_drawn_from_the_seeded_generator() -> None:
    assert Mixup.draw(0.0, 8, torch.device("cpu")) is None
    torch.manual_seed(3)
    first = Mixup.draw(0.4, 8, torch.device("cpu"))
    torch.manual_seed(3)
    again = Mixup.draw(0.4, 8, torch.device("cpu"))
    assert 0 < first.lam < 1 and first.lam == again.lam
    assert torch.equal(first.partner, again.partner) and sorted(first.partner.tolist()) == list(range(8))


def test_blend_mixes_every_part_with_its_partner_and_the_loss_both_labels() -> None:
    mixup = Mixup(0.7, torch.tensor([2, 0, 1]))
    a, b = torch.arange(3.0)[:, None] * torch.ones(3, 4), torch.arange(3.0)[:, None] * 10 * torch.ones(3, 2)
    mixed_a, mixed_b = mixup.blend((a, b))
    assert torch.allclose(mixed_a[0], 0.7 * a[0] + 0.3 * a[2])
    assert torch.allclose(mixed_b[1], 0.7 * b[1] + 0.3 * b[0])
    logits, y = torch.randn(3, 2), torch.tensor([0, 1, 1])
    ce = nn.CrossEntropyLoss()
    expected = 0.7 * ce(logits, y) + 0.3 * ce(logits, torch.tensor([1, 0, 1]))
    assert mixup.loss(ce, logits, y) == pytest.approx(float(expected))


def test_losses_feed_the_model_the_blended_batch() -> None:
    model = nn.Linear(4, 2)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 0])
    mixup = Mixup(0.6, torch.tensor([1, 2, 0]))
    with torch.no_grad():
        loss, logits, _ = _losses(model, x, y, None, nn.CrossEntropyLoss(), 0.0, mixup)
    assert torch.allclose(logits, model(0.6 * x + 0.4 * x[[1, 2, 0]]))
    assert float(loss) == pytest.approx(float(mixup.loss(nn.CrossEntropyLoss(), logits, y)))


def test_a_run_with_mixup_trains_differently_and_is_recorded(image_tree, tmp_path) -> None:
    source = image_tree()
    plain = train(tiny_config(source, tmp_path / "plain", "train.epochs=1")).run_dir
    mixed = train(tiny_config(source, tmp_path / "mixed", "train.epochs=1", "train.mixup_alpha=0.4")).run_dir
    assert history(plain)[0]["train_loss"] != history(mixed)[0]["train_loss"]
    assert "mixup_alpha: 0.4" in (mixed / "config.yaml").read_text()
