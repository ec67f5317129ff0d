"""Views are deterministic functions of (image, view name, seed): what makes feature caching exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from breastvision.data.readers import read_dataset
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import Preprocessing
from breastvision.training.config import ViewConfig
from breastvision.training.views import Item, ViewRenderer, training_views


def _item(root: Path, view: str) -> Item:
    catalog = read_dataset(root)
    record = catalog.records[0]
    return Item(record, catalog.relpath(record), view, 0)


def test_random_views_are_fixed_per_seed_and_fresh_per_epoch_on_request(image_tree) -> None:
    root = image_tree()
    pre = Preprocessing(input_size=32, resize=36)
    fixed = ViewRenderer(ViewConfig(kind="random", count=3, seed=7), pre)
    assert training_views(fixed.config) == ["aug0", "aug1", "aug2"]
    a0 = fixed(_item(root, "aug0"))
    assert torch.equal(a0, fixed(_item(root, "aug0"), epoch=5))  # same draw whatever the epoch
    assert not torch.equal(a0, fixed(_item(root, "aug1")))
    assert not torch.equal(a0, ViewRenderer(ViewConfig(kind="random", seed=8), pre)(_item(root, "aug0")))
    state = torch.get_rng_state()
    fresh = ViewRenderer(ViewConfig(kind="random", seed=7, fresh_each_epoch=True), pre)
    assert not fresh.fixed and fixed.fixed
    assert not torch.equal(fresh(_item(root, "aug0"), epoch=0), fresh(_item(root, "aug0"), epoch=1))
    assert torch.equal(state, torch.get_rng_state())  # callers' random streams are left alone


def test_dihedral_views(image_tree) -> None:
    root = image_tree(size=(40, 40))  # square, so rotating before or after resizing is the same
    renderer = ViewRenderer(ViewConfig(kind="dihedral"), Preprocessing(input_size=32))
    identity, rot90 = renderer(_item(root, "identity")), renderer(_item(root, "rot90"))
    # Up to one grey level (1/255/std): the uint8 resize rounds its two passes in the other order.
    torch.testing.assert_close(rot90, torch.rot90(identity, 1, (-2, -1)), atol=1.001 / 255 / 0.224, rtol=0)
    assert training_views(renderer.config) == ["rot90", "rot180", "rot270", "hflip", "vflip"]


@pytest.mark.parametrize("augment", ["ultrasound_mild", "histology_mild"])
def test_mild_preset_views_are_fixed_per_seed(image_tree, augment: str) -> None:
    """What lets their features be cached: draw k of an image is the same in every epoch and process."""
    root = image_tree()
    pre = Preprocessing(input_size=32, resize=36)
    renderer = ViewRenderer(ViewConfig(kind="random", count=2, augment=augment, seed=3), pre)
    a0 = renderer(_item(root, "aug0"))
    again = ViewRenderer(ViewConfig(kind="random", count=2, augment=augment, seed=3), pre)
    assert torch.equal(a0, again(_item(root, "aug0"), epoch=4))
    assert not torch.equal(a0, renderer(_item(root, "aug1")))
    assert not torch.equal(a0, renderer(_item(root, "identity")))


def test_include_identity_adds_the_evaluated_image_to_the_draws(image_tree) -> None:
    config = ViewConfig(kind="random", count=2, augment="ultrasound_mild", include_identity=True)
    assert training_views(config) == ["identity", "aug0", "aug1"]
    pre = Preprocessing(input_size=32, resize=36)
    root = image_tree()
    identity = ViewRenderer(config, pre)(_item(root, "identity"))
    assert torch.equal(identity, ViewRenderer(ViewConfig(), pre)(_item(root, "identity")))
    with pytest.raises(BreastvisionError, match="include_identity goes with kind: random"):
        training_views(ViewConfig(kind="dihedral", include_identity=True))
