"""Splits: protocol arithmetic on small catalogs, the file format, and leak-freedom on the real data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from breastvision.data.readers import read_dataset
from breastvision.data.records import Catalog, Record
from breastvision.data.splits import (
    H_VIEWS,
    PARTS,
    U_VIEWS,
    Split,
    file_list_sha256,
    make_split,
    straddling_groups,
)
from breastvision.errors import BreastvisionError

ROOT = Path("/data/toy")


def toy_catalog(n_groups: int = 20, per_group: int = 3, name: str = "toy") -> Catalog:
    """Groups of ``per_group`` images; every fourth group is class 1 (imbalanced, like BreakHis)."""
    records = [
        Record(ROOT / f"g{g:02d}" / f"img{i}.png", label=int(g % 4 == 0), group=f"g{g:02d}")
        for g in range(n_groups)
        for i in range(per_group)
    ]
    return Catalog(name, ROOT, ["benign", "malignant"], records, grouping="patient")


def _sizes(split: Split, catalog: Catalog, fold=None) -> dict[str, int]:
    return {part: len(split.subset(catalog, part, fold)) for part in PARTS}


def test_h_random_712_is_exact_and_leaky():
    catalog = toy_catalog()
    split = make_split(catalog, "h_random_712", seed=3)
    assert _sizes(split, catalog) == {"train": 42, "val": 6, "test": 12}
    assert split.leaky and "groups have images on more than one side" in split.leak_reason
    assert straddling_groups(catalog, split)  # 20 groups of 3 cannot survive an image-level split
    assert make_split(catalog, "h_random_712", seed=3).assignment == split.assignment
    assert make_split(catalog, "h_random_712", seed=4).assignment != split.assignment


def test_after_augmentation_keys_are_views():
    catalog = toy_catalog()
    split = make_split(catalog, "h_random_712_after_aug", seed=0)
    assert split.views == H_VIEWS == ("rot90", "rot180", "rot270", "hflip", "vflip")
    assert len(split.assignment) == 5 * len(catalog)
    assert "g00/img0.png::rot90" in split.assignment
    assert _sizes(split, catalog) == {"train": 210, "val": 30, "test": 60}
    pairs = split.subset(catalog, "test")
    assert all(isinstance(i.record, Record) and i.view in H_VIEWS for i in pairs)
    assert "augmented copies on more than one side" in split.leak_reason
    u = make_split(catalog, "u_random_82_after_aug", seed=0)
    assert u.views == U_VIEWS and _sizes(u, catalog) == {"train": 240, "val": 0, "test": 60}


def test_u_random_82_with_external_validation(tmp_path):
    catalog = toy_catalog()
    external = Catalog(
        "hospital", Path("/data/hospital"), ["benign", "malignant"], toy_catalog(2).records[:5]
    )
    external.root = ROOT  # same relative layout, different file list
    split = make_split(catalog, "u_random_82", seed=1, external=external)
    assert _sizes(split, catalog) == {"train": 48, "val": 0, "test": 12}
    assert split.params["external"]["n_files"] == 5
    loaded = Split.load(split.save(tmp_path / "u.json"))
    assert [i.record for i in loaded.subset(external, "val")] == external.records
    assert loaded.subset(external, "train") == []
    wrong_classes = Catalog("h", ROOT, ["normal", "benign", "malignant"], external.records)
    with pytest.raises(BreastvisionError, match="external set classes"):
        make_split(catalog, "u_random_82", external=wrong_classes)
    with pytest.raises(BreastvisionError, match="external validation set goes with u_random_82"):
        make_split(catalog, "group_holdout", external=external)


@pytest.mark.parametrize("fractions", [None, (0.6, 0.2, 0.2), (0.8, 0.0, 0.2)])
def test_group_holdout_is_group_disjoint_and_stratified(fractions):
    catalog = toy_catalog(n_groups=40)
    split = make_split(catalog, "group_holdout", seed=0, fractions=fractions)
    assert not split.leaky and split.leak_reason is None
    assert straddling_groups(catalog, split) == set()
    wanted = fractions or (0.7, 0.1, 0.2)
    sizes = _sizes(split, catalog)
    for part, fraction in zip(PARTS, wanted, strict=True):
        assert abs(sizes[part] / len(catalog) - fraction) <= 0.05, sizes
    test_classes = Counter(i.record.label for i in split.subset(catalog, "test"))
    assert all(i.view is None for i in split.subset(catalog, "test"))  # one type, no views here
    assert test_classes[1] > 0 and test_classes[0] > 0


def test_group_kfold_covers_every_image_once():
    catalog = toy_catalog(n_groups=25)
    split = make_split(catalog, "group_kfold", seed=0, k=5)
    assert split.k == 5 and set(split.assignment.values()) == set(range(5))
    tested = Counter()
    for fold in range(5):
        assert straddling_groups(catalog, split, fold) == set()
        test = split.subset(catalog, "test", fold)
        val = split.subset(catalog, "val", fold)
        assert {split.assignment[catalog.relpath(i.record)] for i in val} == {(fold + 1) % 5}
        assert len(test) + len(val) + len(split.subset(catalog, "train", fold)) == len(catalog)
        tested.update(i.record.path for i in test)
    assert set(tested.values()) == {1} and len(tested) == len(catalog)
    with pytest.raises(BreastvisionError, match="give a fold from 0 to 4"):
        split.subset(catalog, "test")
    with pytest.raises(BreastvisionError, match="has no folds"):
        make_split(catalog, "group_holdout").subset(catalog, "test", fold=0)


def test_too_few_groups_and_bad_arguments():
    catalog = toy_catalog(n_groups=4)
    with pytest.raises(BreastvisionError, match="4 patient groups, too few for 5"):
        make_split(catalog, "group_kfold", k=5)
    with pytest.raises(BreastvisionError, match="unknown split protocol 'random'"):
        make_split(catalog, "random")
    with pytest.raises(BreastvisionError, match="summing to 1"):
        make_split(toy_catalog(), "group_holdout", fractions=(0.5, 0.1, 0.1))
    with pytest.raises(BreastvisionError, match="multiples of 1/m"):
        make_split(toy_catalog(), "group_holdout", fractions=(0.7, 0.13, 0.17))
    with pytest.raises(BreastvisionError, match="fractions apply to group_holdout only"):
        make_split(toy_catalog(), "h_random_712", fractions=(0.6, 0.2, 0.2))


def test_file_round_trip_and_hash_check(tmp_path):
    catalog = toy_catalog()
    split = make_split(catalog, "group_holdout", seed=7)
    path = split.save(tmp_path / "splits" / "holdout.json")
    data = json.loads(path.read_text())
    assert {"protocol", "seed", "leaky", "files_sha256", "assignment", "grouping", "dataset"} <= set(data)
    assert data["files_sha256"] == file_list_sha256([catalog.relpath(r) for r in catalog.records])
    loaded = Split.load(path)
    assert loaded == split
    assert loaded.subset(catalog, "test") == split.subset(catalog, "test")
    smaller = Catalog("toy", ROOT, catalog.class_names, catalog.records[1:])
    with pytest.raises(BreastvisionError, match="was made for 60 files of 'toy'.*has 59 files"):
        loaded.subset(smaller, "train")
    (tmp_path / "bad.json").write_text('{"protocol": "x"}')
    with pytest.raises(BreastvisionError, match="not a split file"):
        Split.load(tmp_path / "bad.json")
    with pytest.raises(BreastvisionError, match="cannot read split file"):
        Split.load(tmp_path / "missing.json")


def test_file_list_hash_ignores_order():
    assert file_list_sha256(["b", "a"]) == file_list_sha256(["a", "b"]) != file_list_sha256(["a"])


# ------------------------------------------------------------- real shared data


@pytest.fixture(scope="module")
def real_catalogs(data_root):
    found = {}
    for name, options in [
        ("busi", {}),
        ("breakhis", {"group_by": "slide"}),
        ("breakhis", {"group_by": "patient"}),
        ("lc25000", {}),
    ]:
        try:
            found[f"{name}-{options.get('group_by', 'default')}"] = read_dataset(
                name, root=data_root, **options
            )
        except BreastvisionError:
            continue
    if not found:
        pytest.skip("no shared dataset found")
    return found


def test_leak_free_splits_on_real_data(real_catalogs):
    for key, catalog in real_catalogs.items():
        holdout = make_split(catalog, "group_holdout", seed=0)
        assert straddling_groups(catalog, holdout) == set(), key
        assert all(holdout.subset(catalog, part) for part in PARTS), key
        kfold = make_split(catalog, "group_kfold", seed=0, k=5)
        for fold in range(5):
            assert straddling_groups(catalog, kfold, fold) == set(), (key, fold)
        # And the check has teeth: the papers' random split does straddle.
        assert straddling_groups(catalog, make_split(catalog, "h_random_712", seed=0)), key


def test_strict_patient_grouping_keeps_slides_of_one_patient_together(real_catalogs):
    catalog = real_catalogs.get("breakhis-patient")
    if catalog is None:
        pytest.skip("BreakHis manifest absent")
    split = make_split(catalog, "group_holdout", seed=0)
    sides = {
        split.assignment[catalog.relpath(r)]
        for r in catalog.records
        if r.meta["slide"] in {"29960AB", "29960CD"}
    }
    assert len(sides) == 1
