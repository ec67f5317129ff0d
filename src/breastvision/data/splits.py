"""Splits: saved, reproducible, leak-aware assignments of a catalog's images to train / val / test.

A :class:`Split` is a JSON file naming its protocol, seed, whether it is leaky (and why), the
dataset, the grouping, the SHA-256 of the sorted relative file list, and the assignment of every
image — or every (image, view) pair for the protocols that split after offline augmentation. Any
later command takes the file and checks the hash, so every number names the images it came from.

Protocols (:data:`PROTOCOLS`):

``h_random_712``
    Paper 000: random image-level 7:1:2 train/val/test, shuffled. Leaky: images of one patient
    (slide) land on both sides.
``h_random_712_after_aug``
    Paper 000 read literally: the 5× offline augmentation (:data:`H_VIEWS`) comes first and the
    7:1:2 split is drawn over the augmented copies, so rotations of one image land in train and
    test. Keys are ``relpath::view``.
``u_random_82``
    Paper 003: random image-level 8:2 train/test, optionally with an external validation folder
    (the paper's 31 hospital images), recorded by its own file-list hash. Leaky: BUSI
    near-duplicates land on both sides.
``u_random_82_after_aug``
    Paper 003 read literally (its Table 3: 3,120 / 780 images after "expansion to 5×"): the 8:2
    split over 5 random augmented views per image (:data:`U_VIEWS`; view ``aug<i>`` is the i-th
    random augmentation of that image).
``group_holdout`` (leak-free default)
    Group-disjoint, class-stratified train/val/test with the given fractions (default 7:1:2, the
    proportions of paper 000 so results compare). Groups are dealt into ``m`` stratified folds by
    scikit-learn's ``StratifiedGroupKFold``, ``m`` the smallest number of folds that expresses the
    fractions (10 for 7:1:2); whole folds then go to test, val and train.
``group_kfold`` (leak-free)
    Grouped, stratified k-fold (``StratifiedGroupKFold``). The assignment gives each image its fold;
    for fold ``i``, fold ``i`` is the test set, fold ``(i + 1) mod k`` the validation set and the
    rest the training set — so validation is group-disjoint too and stored in the same file.

Fractions are of images for the random protocols and of groups-as-dealt for the grouped ones, so
grouped parts can differ from the target by a group's size; the file records the actual counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from breastvision import __version__
from breastvision.data.records import Catalog, Record
from breastvision.errors import BreastvisionError

FORMAT = "breastvision-split/1"
PARTS = ("train", "val", "test")
H_VIEWS = ("rot90", "rot180", "rot270", "hflip", "vflip")
U_VIEWS = tuple(f"aug{i}" for i in range(5))
VIEW_SEPARATOR = "::"


@dataclass(frozen=True)
class Protocol:
    leaky: bool
    fractions: tuple[float, float, float] | None
    views: tuple[str, ...] = ()
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {
    "h_random_712": Protocol(True, (0.7, 0.1, 0.2), (), "paper 000: random image-level 7:1:2"),
    "h_random_712_after_aug": Protocol(
        True, (0.7, 0.1, 0.2), H_VIEWS, "paper 000: random 7:1:2 after 5× rotation/flip augmentation"
    ),
    "u_random_82": Protocol(True, (0.8, 0.0, 0.2), (), "paper 003: random image-level 8:2 train/test"),
    "u_random_82_after_aug": Protocol(
        True, (0.8, 0.0, 0.2), U_VIEWS, "paper 003: random 8:2 after 5× random augmentation"
    ),
    "group_holdout": Protocol(False, None, (), "group-disjoint, class-stratified train/val/test"),
    "group_kfold": Protocol(False, None, (), "grouped, stratified k-fold; val = next fold"),
}
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def file_list_sha256(relpaths: Sequence[str]) -> str:
    """SHA-256 of the sorted relative paths, each followed by a newline, in UTF-8."""
    digest = hashlib.sha256()
    for rel in sorted(relpaths):
        digest.update(rel.encode("utf-8") + b"\n")
    return digest.hexdigest()


def catalog_sha256(catalog: Catalog) -> str:
    return file_list_sha256(_relpaths(catalog))


def _relpaths(catalog: Catalog) -> list[str]:
    return [catalog.relpath(r) for r in catalog.records]


@dataclass(frozen=True)
class SplitItem:
    """One entry of a split part: a record, and for protocols split after offline augmentation
    the view that was assigned (``None``: the image itself)."""

    record: Record
    view: str | None = None


@dataclass
class Split:
    """A saved split; see the module docstring for the protocols and the key format."""

    protocol: str
    seed: int
    leaky: bool
    leak_reason: str | None
    dataset: str
    source: str
    grouping: str
    files_sha256: str
    n_files: int
    assignment: dict[str, str | int]
    params: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    created_by: str = f"breastvision {__version__}"

    @property
    def views(self) -> tuple[str, ...]:
        """View names for protocols that split after augmentation; empty otherwise."""
        return tuple(self.params.get("views", ()))

    @property
    def k(self) -> int | None:
        return self.params.get("k") if self.protocol == "group_kfold" else None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n")
        except OSError as err:
            raise BreastvisionError(f"cannot write split file {path} ({err.strerror})") from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Split:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as err:
            raise BreastvisionError(f"cannot read split file {path} ({err.strerror})") from None
        except ValueError as err:
            raise BreastvisionError(f"{path} is not a split file (invalid JSON: {err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BreastvisionError(f"{path} is not a split file (expected format {FORMAT})")
        try:
            return cls(**data)
        except TypeError as err:
            raise BreastvisionError(f"{path}: malformed split file ({err})") from None

    def read_catalog(self, root: str | os.PathLike | None = None) -> Catalog:
        """Read the dataset again as this split was made (same source and read options), checked."""
        from breastvision.data.readers import read_dataset

        catalog = read_dataset(self.source, root, **self.params.get("read_options", {}))
        self.check(catalog)
        return catalog

    def check(self, catalog: Catalog, relpaths: list[str] | None = None) -> None:
        """Raise unless ``catalog`` holds exactly the files this split was made for."""
        digest = file_list_sha256(relpaths if relpaths is not None else _relpaths(catalog))
        if digest != self.files_sha256:
            raise BreastvisionError(
                f"split '{self.protocol}' (seed {self.seed}) was made for {self.n_files} files of "
                f"'{self.dataset}' (sha256 {self.files_sha256[:12]}…), but the data read now has "
                f"{len(catalog)} files (sha256 {digest[:12]}…): same dataset and read options?"
            )

    def _external_matches(self, catalog: Catalog) -> bool:
        external = self.params.get("external")
        return bool(external) and catalog_sha256(catalog) == external["files_sha256"]

    def subset(
        self, catalog: Catalog, part: str, fold: int | None = None
    ) -> list[SplitItem]:
        """The items of one part (``train``, ``val`` or ``test``), in catalog order.

        For view-level protocols each item names its view (several per record); otherwise the
        view is ``None``. For ``group_kfold`` give ``fold``. An external validation catalog
        (``u_random_82`` with ``external``) gives all its records for ``val``. Raises if the
        catalog does not match.
        """
        if part not in PARTS:
            raise BreastvisionError(f"unknown split part '{part}'; use one of {', '.join(PARTS)}")
        if self._external_matches(catalog):
            return [SplitItem(r) for r in catalog.records] if part == "val" else []
        rels = _relpaths(catalog)
        self.check(catalog, rels)
        wanted = self._wanted(part, fold)
        records = catalog.records
        if not self.views:
            return [
                SplitItem(r) for r, rel in zip(records, rels, strict=True) if self.assignment[rel] in wanted
            ]
        return [
            SplitItem(r, view)
            for r, rel in zip(records, rels, strict=True)
            for view in self.views
            if self.assignment[f"{rel}{VIEW_SEPARATOR}{view}"] in wanted
        ]

    def _wanted(self, part: str, fold: int | None) -> set[str | int]:
        k = self.k
        if k is None:
            if fold is not None:
                raise BreastvisionError(f"split '{self.protocol}' has no folds; do not give a fold")
            return {part}
        if fold is None or not 0 <= fold < k:
            raise BreastvisionError(f"split '{self.protocol}' has {k} folds: give a fold from 0 to {k - 1}")
        test, val = fold, (fold + 1) % k
        return {"test": {test}, "val": {val}, "train": set(range(k)) - {test, val}}[part]

    def counts(self, catalog: Catalog, fold: int | None = None) -> dict[str, Counter]:
        """Per part, how many images (or image views) of each class."""
        return {
            part: Counter(
                catalog.class_names[item.record.label]
                for item in self.subset(catalog, part, fold)
            )
            for part in PARTS
        }


def straddling_groups(catalog: Catalog, split: Split, fold: int | None = None) -> set[str]:
    """Groups with images in more than one part: empty for every leak-free split."""
    parts_of: dict[str, set[str]] = {}
    for part in PARTS:
        for item in split.subset(catalog, part, fold):
            parts_of.setdefault(item.record.group, set()).add(part)
    return {group for group, parts in parts_of.items() if len(parts) > 1}


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise BreastvisionError(
            f"fractions {list(fractions)} must be three numbers ≥ 0 (train, val, test) summing to 1"
        )
    if fractions[0] == 0 or fractions[2] == 0:
        raise BreastvisionError("train and test fractions must be above 0")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _random_assignment(keys: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    order = np.random.default_rng(seed).permutation(len(keys))
    n_train = round(fractions[0] * len(keys))
    n_val = round(fractions[1] * len(keys))
    parts = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(keys) - n_train - n_val)
    return {keys[i]: parts[rank] for rank, i in enumerate(order)}


def _folds(catalog: Catalog, n_splits: int, seed: int) -> np.ndarray:
    """A stratified, group-disjoint fold index per record."""
    groups = catalog.groups
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise BreastvisionError(
            f"'{catalog.name}' has {n_groups} {catalog.grouping} groups, too few for {n_splits} "
            "group-disjoint folds"
        )
    folds = np.empty(len(catalog), dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for index, (_, test) in enumerate(splitter.split(np.zeros(len(catalog)), catalog.labels, groups)):
        folds[test] = index
    return folds


def _fold_counts(fractions: tuple[float, float, float]) -> tuple[int, list[int]]:
    """Smallest number of folds (≤ 20) expressing the fractions exactly, and folds per part."""
    for m in range(2, 21):
        counts = [round(f * m) for f in fractions]
        if all(abs(f * m - c) < 1e-6 for f, c in zip(fractions, counts, strict=True)):
            return m, counts
    shown = ", ".join(str(Fraction(f).limit_denominator(100)) for f in fractions)
    raise BreastvisionError(f"grouped fractions ({shown}) must be multiples of 1/m for some m ≤ 20")


def _assignment(
    catalog: Catalog, protocol: str, seed: int, k: int, fractions: Sequence[float] | None
) -> tuple[dict[str, str | int], dict[str, Any]]:
    """Each key's part (or fold) under ``protocol``, and the parameters that say how."""
    spec = PROTOCOLS[protocol]
    rels = _relpaths(catalog)
    if spec.fractions is not None:
        keys = [f"{rel}{VIEW_SEPARATOR}{v}" for rel in rels for v in spec.views] if spec.views else rels
        assignment: dict[str, str | int] = dict(_random_assignment(sorted(keys), spec.fractions, seed))
        params: dict[str, Any] = {"fractions": list(spec.fractions)}
        if spec.views:
            params["views"] = list(spec.views)
        return assignment, params
    if protocol == "group_kfold":
        if k < 2:
            raise BreastvisionError(f"k-fold needs k ≥ 2 (got {k})")
        folds = _folds(catalog, k, seed)
        return {rel: int(fold) for rel, fold in zip(rels, folds, strict=True)}, {"k": k}
    chosen = _check_fractions(fractions or DEFAULT_FRACTIONS)
    m, (_, n_val, n_test) = _fold_counts(chosen)
    folds = _folds(catalog, m, seed)
    part_of_fold = ["test"] * n_test + ["val"] * n_val + ["train"] * (m - n_test - n_val)
    assignment = {rel: part_of_fold[fold] for rel, fold in zip(rels, folds, strict=True)}
    return assignment, {"fractions": list(chosen), "folds_dealt": m}


def _external(catalog: Catalog, external: Catalog) -> dict[str, Any]:
    if external.class_names != catalog.class_names:
        raise BreastvisionError(
            f"external set classes {external.class_names} differ from {catalog.class_names}"
        )
    return {
        "dataset": external.name,
        "source": str(external.meta.get("source", external.root)),
        "files_sha256": catalog_sha256(external),
        "n_files": len(external),
    }


def make_split(
    catalog: Catalog,
    protocol: str,
    seed: int = 0,
    *,
    k: int = 5,
    fractions: Sequence[float] | None = None,
    external: Catalog | None = None,
) -> Split:
    """Make a split of ``catalog`` by ``protocol`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise BreastvisionError(f"unknown split protocol '{protocol}'; use one of {', '.join(PROTOCOLS)}")
    spec = PROTOCOLS[protocol]
    if external is not None and not protocol.startswith("u_random_82"):
        raise BreastvisionError(f"an external validation set goes with u_random_82 protocols, not {protocol}")
    if fractions is not None and (spec.fractions is not None or protocol == "group_kfold"):
        raise BreastvisionError(f"{protocol} has fixed proportions; fractions apply to group_holdout only")
    assignment, how = _assignment(catalog, protocol, seed, k, fractions)
    params: dict[str, Any] = {
        "description": spec.description,
        "read_options": catalog.meta.get("read_options", {}),
        **how,
    }
    if external is not None:
        params["external"] = _external(catalog, external)
    rels = _relpaths(catalog)
    split = Split(
        protocol=protocol,
        seed=seed,
        leaky=spec.leaky,
        leak_reason=None,
        dataset=catalog.name,
        source=str(catalog.meta.get("source", catalog.root)),
        grouping=catalog.grouping,
        files_sha256=file_list_sha256(rels),
        n_files=len(rels),
        assignment=assignment,
        params=params,
    )
    split.leak_reason = _leak_reason(catalog, split) if spec.leaky else None
    return split


def _leak_reason(catalog: Catalog, split: Split) -> str:
    """Say, with this split's own numbers, what crosses from training into test."""
    n_groups = len(set(catalog.groups))
    straddle = len(straddling_groups(catalog, split))
    reason = (
        f"random image-level split ignores groups: {straddle} of {n_groups} {catalog.grouping} "
        f"groups have images on more than one side"
    )
    if split.views:
        rels = set(_relpaths(catalog))
        spread = sum(
            len({split.assignment[f"{rel}{VIEW_SEPARATOR}{v}"] for v in split.views}) > 1 for rel in rels
        )
        reason = (
            f"split after augmentation: {spread} of {len(rels)} images have augmented copies on "
            f"more than one side; {reason}"
        )
    return reason
