"""Freezing really freezes: no gradient, weights and BatchNorm statistics unchanged after a step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from breastvision.models.registry import create_model
from breastvision.models.staging import stages
from breastvision.training.freezing import freeze_before, is_frozen, unfreeze


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("arch", "first_trainable", "size"),
    [("resnet18", "layer3", 32), ("densenet121_se", "denseblock4", 32)],
)
def test_frozen_prefix_does_not_move(arch: str, first_trainable: str, size: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3)
    prefix, suffix = freeze_before(model, first_trainable)
    assert is_frozen(prefix) and not is_frozen(suffix)
    frozen_before, trainable_before = _snapshot(prefix), _snapshot(suffix)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

    model.train()  # the frozen part must stay in eval mode regardless
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    assert not any(m.training for m in prefix.modules())
    assert all(p.grad is None and not p.requires_grad for p in prefix.parameters())
    for key, value in _snapshot(prefix).items():  # weights and BatchNorm running stats alike
        assert torch.equal(value, frozen_before[key]), key
    changed = {k for k, v in _snapshot(suffix).items() if not torch.equal(v, trainable_before[k])}
    bn_stats = {k for k in trainable_before if k.endswith("running_mean")}
    assert bn_stats and bn_stats <= changed  # BatchNorm of the trainable part still learns statistics
    assert all(p.grad is not None for p in suffix.parameters() if p.requires_grad)
    assert suffix(prefix(x.clone())).shape == (4, 3)
    assert stages(model).index(first_trainable) > 0


def test_unfreeze_restores_training() -> None:
    model = create_model("resnet18", num_classes=2)
    prefix, _ = freeze_before(model, "layer2")
    unfreeze(prefix)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    model(torch.randn(2, 3, 32, 32))
    assert all(m.training for m in model.modules())


def test_nothing_frozen_without_a_stage() -> None:
    model = create_model("resnet18", num_classes=2)
    prefix, suffix = freeze_before(model, None)
    assert isinstance(prefix, nn.Identity) and suffix is model
