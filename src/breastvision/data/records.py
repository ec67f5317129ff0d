"""The common record every reader produces, and the catalog that holds a dataset's records."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    """One image sample.

    ``group`` is what must never straddle a split: a BreakHis slide or patient, an LC25000 tile
    group, a BUSI near-duplicate group, or the image itself when nothing finer is known.
    """

    path: Path
    label: int
    group: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    masks: tuple[Path, ...] = ()

    @property
    def subtype(self) -> str | None:
        """The finer diagnosis the reader knows (BreakHis: ``fibroadenoma``, ``ductal_carcinoma``…;
        a manifest's ``subtype`` column), ``None`` when it knows none: reports break recall down by it."""
        value = self.meta.get("subtype_name", self.meta.get("subtype"))
        return None if value in (None, "") else str(value)


@dataclass(frozen=True)
class Skipped:
    """A file a reader did not take, and why; every run reports these."""

    path: Path
    reason: str


#: ``Catalog.grouping`` values whose groups are patients (BreakHis slides: one slide per patient;
#: a manifest's ``patient`` / ``patient_id`` column), so patient-level metrics and the patient
#: bootstrap apply. Other groupings, such as BUSI's near-duplicate groups, are not patients.
PATIENT_GROUPINGS = frozenset({"patient", "patient_id", "slide"})


@dataclass
class Catalog:
    """A dataset read from disk: its records, class names, and what was skipped."""

    name: str
    root: Path
    class_names: list[str]
    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)
    #: How ``Record.group`` was formed, e.g. ``"slide"``, ``"patient"``, ``"tile_group"``.
    grouping: str = "image"
    #: The reader's facts: ``format``, ``read_options``, ``source``, and for BUSI, BreakHis and
    #: LC25000 the imaging ``modality`` (``models.tta``: it decides a model's test-time views).
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    @property
    def groups(self) -> list[str]:
        return [r.group for r in self.records]

    def relpath(self, record: Record) -> str:
        """The record's path relative to ``root`` with forward slashes: the key a split file uses."""
        # String prefix first: Path.relative_to is slow enough to dominate split bookkeeping.
        root, path = str(self.root).rstrip(os.sep) + os.sep, str(record.path)
        if path.startswith(root):
            return path[len(root) :].replace(os.sep, "/")
        return record.path.relative_to(self.root).as_posix()
