"""Class imbalance: balanced loss weights and the class-balanced, (seed, epoch)-deterministic sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from breastvision.errors import BreastvisionError
from breastvision.training.balance import class_weights, classification_loss, sample_weights
from breastvision.training.config import TrainConfig
from breastvision.training.loop import EpochSampler

NAMES = ["normal", "benign", "malignant"]


def test_balanced_weights_are_n_over_k_times_the_class_count() -> None:
    labels = [0] * 4 + [1] * 2 + [2]
    np.testing.assert_allclose(class_weights(labels, NAMES), [7 / 12, 7 / 6, 7 / 3])
    np.testing.assert_allclose(class_weights([0, 1, 2, 2, 1, 0], NAMES), [1, 1, 1])
    with pytest.raises(BreastvisionError, match="no training image is of class malignant"):
        class_weights([0, 1, 1], NAMES)


def test_the_loss_carries_the_weights_and_the_facts_name_them() -> None:
    labels = [0] * 4 + [1] * 2 + [2]
    weighted = TrainConfig(class_weighting="balanced", label_smoothing=0.1)
    loss, facts = classification_loss(weighted, labels, NAMES)
    torch.testing.assert_close(loss.weight, torch.tensor([7 / 12, 7 / 6, 7 / 3]))
    assert loss.label_smoothing == 0.1
    assert facts["class_weights"] == pytest.approx({"normal": 7 / 12, "benign": 7 / 6, "malignant": 7 / 3})
    assert facts["training_items_per_class"] == {"normal": 4, "benign": 2, "malignant": 1}
    plain, facts = classification_loss(TrainConfig(), labels, NAMES)
    assert plain.weight is None and "class_weights" not in facts and facts["sampler"] == "shuffle"
    with pytest.raises(BreastvisionError, match="train.sampler is balanced but no training image"):
        classification_loss(TrainConfig(sampler="balanced"), [0, 0, 1], NAMES)


def _draws(labels: list[int], seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    weights = sample_weights(labels)
    sampler = EpochSampler(len(labels), rank, world, seed, shuffle=True, pad=True, weights=weights)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_balanced_sampler_draws_each_class_about_equally_and_only_by_seed_and_epoch() -> None:
    labels = [0] * 600 + [1] * 300 + [2] * 100  # BUSI-like 6 : 3 : 1
    draws = _draws(labels, seed=3, epoch=0)
    assert len(draws) == len(labels)
    counts = Counter(labels[i] for i in draws)
    assert all(abs(counts[c] / len(draws) - 1 / 3) < 0.05 for c in range(3)), counts
    assert len(set(draws) & set(range(900, 1000))) > 90  # the minority's images repeated, nearly all seen
    assert draws == _draws(labels, seed=3, epoch=0)  # a resumed run draws the same epoch
    assert draws != _draws(labels, seed=3, epoch=1) and draws != _draws(labels, seed=4, epoch=0)
    shards = [_draws(labels[:7], seed=0, epoch=2, rank=r, world=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # DDP: equal steps, the same epoch's draws split
