"""A run's data: the catalog, the split (with a validation part carved from training when it has
none) and the train / val / test items every process computes the same way.

Training items are each training image under each configured view, or the split's own (image,
view) pairs for protocols that split after augmentation; validation and test items are the images
themselves (or the split's pairs). With ``data.tta`` (image-level splits only: a view-level split
already fixes which views are scored) the validation images are also scored under the set's other
views (:attr:`RunData.val_views`, at the end of training: ``engine``), and the predictor averages the
set over each test image.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from breastvision.data.records import Catalog
from breastvision.data.splits import VIEW_SEPARATOR, Split, SplitItem
from breastvision.data.transforms import tta_views
from breastvision.errors import BreastvisionError
from breastvision.training.config import ExperimentConfig
from breastvision.training.views import Item, training_views, tta_view


@dataclass(frozen=True)
class TestTarget:
    """One test prediction: its true label, its key in predictions.csv, its group, the file and
    view (``None``: the image as stored) the predictor scores, and its subtype (``Record.subtype``)."""

    label: int
    key: str
    group: str
    path: Path
    view: str | None
    subtype: str | None = None


@dataclass
class RunData:
    catalog: Catalog
    split: Split
    train: list[Item]
    val: list[Item]
    test: list[Item]
    tta: str | None
    #: One per test prediction, in target order.
    test_targets: list[TestTarget]

    @property
    def eval_tta(self) -> str | None:
        """The view set the validation predictions and the test part are averaged over (``data.tta``,
        image-level splits), ``None``: none."""
        return None if self.split.views else self.tta

    @property
    def val_views(self) -> list[Item]:
        """The validation items under each view of :attr:`eval_tta` but the first (``identity``, which
        ``val`` holds), view after view, each keeping its image's target; the views are taken of the
        pre-processed tensor, as predictors take them (``views.tta_view``)."""
        views = tta_views(self.eval_tta)[1:]
        return [replace(item, view=tta_view(view)) for view in views for item in self.val]

    @property
    def class_names(self) -> list[str]:
        return list(self.catalog.class_names)

    def facts(self) -> dict[str, Any]:
        """The counts a run records (``RunFacts``' data fields)."""
        parts = {"train": self.train, "val": self.val, "test": self.test}
        return {
            "images": {part: len({i.record.path for i in items}) for part, items in parts.items()},
            "views": {part: len(items) for part, items in parts.items()},
            "test_predictions": len(self.test_targets),
            "skipped_files": len(self.catalog.skipped),
        }


def _read(source: str, root: str | None, options: dict[str, Any]) -> Catalog:
    from breastvision.data.readers import read_dataset

    return read_dataset(source, root, **options)


def _make_split(config: ExperimentConfig, catalog: Catalog, external: Catalog | None) -> Split:
    from breastvision.data.splits import make_split

    spec = config.data.split
    if spec.file:
        split = Split.load(spec.file)
        split.check(catalog)
        return split
    options = dict(spec.options)
    if external is not None:
        options["external"] = external
    try:
        return make_split(catalog, spec.protocol, spec.seed, **options)
    except TypeError as err:
        raise BreastvisionError(f"bad data.split.options {sorted(spec.options)}: {err}") from None


def carve_validation(split: Split, catalog: Catalog, fraction: float, seed: int) -> Split:
    """A copy of ``split`` whose training part gives up a group-disjoint, class-stratified
    ``fraction`` to validation (the smallest number of stratified group folds ≥ 1/fraction, one fold
    taken), so model selection never looks at the test part."""
    records = list({id(i.record): i.record for i in split.subset(catalog, "train")}.values())
    # Fewer folds (a larger share) when a class has fewer images than folds, as on tiny data sets.
    smallest_class = min(Counter(r.label for r in records).values())
    n_folds = min(round(1 / fraction), smallest_class, len({r.group for r in records}))
    if n_folds < 2:
        raise BreastvisionError(f"too few training images or groups to hold out {fraction:.0%} to validate")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    _, val_idx = next(
        splitter.split(np.zeros(len(records)), [r.label for r in records], [r.group for r in records])
    )
    val_rels = {catalog.relpath(records[i]) for i in val_idx}
    assignment = dict(split.assignment)
    for key, part in split.assignment.items():
        if part == "train" and key.split(VIEW_SEPARATOR)[0] in val_rels:
            assignment[key] = "val"
    params = {
        **split.params,
        "val_carved_from_train": {"fraction": fraction, "seed": seed, "n_images": len(val_rels)},
    }
    return replace(split, assignment=assignment, params=params)


def _items(entries: list[SplitItem], catalog: Catalog, views: list[str] | None) -> list[Item]:
    """Items of a split part: each record under each of ``views`` (all sharing the record's target),
    or the split's own (record, view) pairs, each its own target."""
    items: list[Item] = []
    for target, entry in enumerate(entries):
        rel = catalog.relpath(entry.record)
        names = [entry.view] if entry.view is not None else views or ["identity"]
        items += [Item(entry.record, rel, v, target) for v in names]
    return items


def _test_targets(test: list[Item], view_level: bool) -> list[TestTarget]:
    def target(item: Item) -> TestTarget:
        record = item.record
        if view_level:
            key = f"{item.relpath}{VIEW_SEPARATOR}{item.view}"
            return TestTarget(record.label, key, record.group, record.path, item.view, record.subtype)
        return TestTarget(record.label, item.relpath, record.group, record.path, None, record.subtype)

    return [target(item) for item in test]


def prepare_data(config: ExperimentConfig) -> RunData:
    """Catalog, split and items of a config (module docstring)."""
    data = config.data
    catalog = _read(data.source, data.root, data.options)
    external = _read(data.external_val, data.root, {}) if data.external_val else None
    split = _make_split(config, catalog, external)
    val_source = catalog
    if external is not None:
        val_source = external
    elif not split.subset(catalog, "val", data.fold):
        split = carve_validation(split, catalog, data.val_fraction, config.data.split.seed)
    train_views = None if split.views else training_views(data.views)
    train = _items(split.subset(catalog, "train", data.fold), catalog, train_views)
    val = _items(split.subset(val_source, "val", data.fold), val_source, None)
    test = _items(split.subset(catalog, "test", data.fold), catalog, None)
    for part, items in (("train", train), ("val", val), ("test", test)):
        if not items:
            raise BreastvisionError(
                f"the split leaves no {part} images (protocol {split.protocol}, fold {data.fold})"
            )
    return RunData(catalog, split, train, val, test, data.tta, _test_targets(test, bool(split.views)))
