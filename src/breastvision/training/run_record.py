"""A finished run, typed: what a run folder holds, and the one rule for "is this the same run?".

Training builds a :class:`RunRecord` and saves it (``training.outputs``); cross-validation,
transfer chains, the reproductions and ``evaluate`` read run folders with :meth:`RunRecord.load`
and use its fields instead of parsing the files themselves. The files stay those a reader of a run
folder expects (``evaluation.report`` writes the human-readable ones)::

    config.yaml       the resolved config               -> RunRecord.config
    split.json        the split file                    -> RunRecord.split (a SplitRef)
    metrics.json      evaluate_predictions' dict        -> RunRecord.metrics
    provenance.json   weights' origin, lineage, facts   -> .weights_origin, .lineage, .facts
    predictions.csv   per-test-image probabilities      -> RunRecord.predictions
    val_predictions.csv  the same for the validation part  -> RunRecord.val_predictions
    model.safetensors the model file                    -> RunRecord.model_file

:func:`config_differences` is the only comparison of a saved config with a new one: reusing a
finished run (cross-validation folds, chain stages, reproductions) needs no difference; resuming a
checkpoint allows differences in ``train`` (more epochs, another learning-rate schedule).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from breastvision.errors import BreastvisionError

#: Settings that change speed, display or where files are, not results: a run may be reused or
#: resumed with other values. ``name`` is a label, so a config renamed (or one ``extends`` with
#: nothing but another name) reuses the runs of its original.
SPEED_KEYS = frozenset({
    "name", "output_dir", "weights_root", "data.num_workers",
    "train.threads", "train.progress", "train.cache_backend", "train.cache_dir", "data.stain.cache_dir",
})

VAL_PREDICTIONS = "val_predictions.csv"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, child in value.items():
            out.update(_flatten(child, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _plain(value: Any) -> Any:
    """JSON types only (tuples as lists, paths as text), so saved and new configs compare equal."""
    return json.loads(json.dumps(value, default=str))


def _moot(flat: Mapping[str, Any]) -> set[str]:
    """Keys whose value cannot change what a run of this (flattened) config does: the view list of
    views that are not ``dihedral`` (an ``extends`` turning a parent's dihedral views into random
    draws keeps the parent's list)."""
    return set() if flat.get("data.views.kind") == "dihedral" else {"data.views.names"}


def config_differences(
    saved: Mapping[str, Any], config: Any, *, may_differ: Sequence[str] = ()
) -> list[str]:
    """Dotted keys whose values differ between a saved config dict and ``config`` (an
    ``ExperimentConfig`` or its dict), ignoring :data:`SPEED_KEYS`, keys that are moot in both
    (:func:`_moot`) and keys under the sections named in ``may_differ``; each entry reads
    ``key: saved → now``. A key missing from the saved config (added by a later version) stands for
    its default."""
    from breastvision.training.config import ExperimentConfig

    now = config.to_dict() if hasattr(config, "to_dict") else config
    old, new = _flatten(_plain(saved)), _flatten(_plain(now))
    # A key the saved config lacks is newer than its run, which did what the key's default does.
    defaults = _flatten(_plain(ExperimentConfig().to_dict()))
    old = {**{k: defaults[k] for k in new.keys() - old.keys() if k in defaults}, **old}
    free = tuple(f"{section}." for section in may_differ)
    ignored = SPEED_KEYS | (_moot(old) & _moot(new))
    keys = sorted(k for k in old.keys() | new.keys()
                  if k not in ignored and not k.startswith(free) and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys]


@dataclass(frozen=True)
class SplitRef:
    """Which split file a run used, and its descriptive fields (the assignment stays in the file)."""

    file: Path
    sha256: str
    protocol: str | None = None
    leaky: bool | None = None
    grouping: str | None = None
    seed: int | None = None

    @classmethod
    def read(cls, path: Path) -> SplitRef | None:
        if not path.is_file():
            return None
        from breastvision.paths import file_sha256

        content = json.loads(path.read_text())
        return cls(path, file_sha256(path), content.get("protocol"), content.get("leaky"),
                   content.get("grouping"), content.get("seed"))


@dataclass(frozen=True, eq=False)
class Predictions:
    """Per-test-image predictions: what ``predictions.csv`` holds. ``operating_points`` and the
    scope (``scope_scores`` with the model file's ``scope_threshold``) add the decision and flag
    columns when saved; reading a table back keeps what metrics need. ``subtypes`` holds each
    image's ``Record.subtype`` (``None`` when the data names none for any image)."""

    keys: list[str]
    groups: list[str]
    y_true: np.ndarray
    probs: np.ndarray
    class_names: list[str]
    operating_points: dict[str, Any] | None = None
    scope_scores: np.ndarray | None = None
    scope_threshold: float | None = None
    subtypes: list[str | None] | None = None

    def save(self, path: Path) -> Path:
        from breastvision.serving.predict import Judge, write_predictions_csv

        judge = Judge(self.class_names, self.operating_points, scope_threshold=self.scope_threshold)
        scores = [None] * len(self.keys) if self.scope_scores is None else self.scope_scores
        subtypes = [None] * len(self.keys) if self.subtypes is None else self.subtypes
        columns = zip(self.keys, self.groups, self.y_true, self.probs, scores, subtypes, strict=True)
        rows = [judge(key, Path(key), row, score, true_label=self.class_names[label], group=group,
                      subtype=subtype)
                for key, group, label, row, score, subtype in columns]
        return write_predictions_csv(path, rows, self.class_names, self.operating_points)

    @classmethod
    def read(cls, path: Path) -> Predictions:
        if not path.is_file():
            raise BreastvisionError(f"{path.parent} has no {path.name}: not a finished run")
        with path.open(newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if not r.get("skipped")]
        if not rows:
            raise BreastvisionError(f"{path} holds no predictions")
        # ``p_<class>``; run folders of earlier releases wrote ``prob_<class>``.
        prefix = "p_" if any(k.startswith("p_") for k in rows[0]) else "prob_"
        names = [k.removeprefix(prefix) for k in rows[0] if k.startswith(prefix)]
        unknown = {r["true_label"] for r in rows} - set(names)
        if unknown:
            raise BreastvisionError(f"{path}: labels {sorted(unknown)} have no probability column")
        probs = np.array([[float(r[f"{prefix}{c}"]) for c in names] for r in rows])
        labels = np.array([names.index(r["true_label"]) for r in rows])
        # Imported here: evaluation pulls in scikit-learn and SciPy, which reading a run need not.
        from breastvision.evaluation.subtypes import known_subtypes

        # Tables written before the ``subtype`` column have none.
        subtypes = known_subtypes([r.get("subtype") or None for r in rows])
        return cls([r["path"] for r in rows], [r["group"] for r in rows], labels, probs, names,
                   subtypes=subtypes)


@dataclass
class RunFacts:
    """What a training run measured about itself (the report's "Run facts" table)."""

    #: Distinct images and model inputs (image views) per part.
    images: dict[str, int] | None = None
    views: dict[str, int] | None = None
    test_predictions: int | None = None
    skipped_files: int | None = None
    #: Stain normaliser: method, reference, tiles left unnormalised.
    stain: dict[str, Any] | None = None
    #: Frozen-prefix cache: used, entries reused / computed, feature shape.
    feature_cache: dict[str, Any] | None = None
    parameters: int | None = None
    trainable_parameters: int | None = None
    device: str | None = None
    processes: int | None = None
    precision: str | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    seconds_to_best_epoch: float | None = None
    wall_clock_seconds_this_session: float | None = None
    test_time_augmentation: str | None = None
    #: Class imbalance: ``train.class_weighting`` and ``train.sampler``, the training items per
    #: class and, when weighted, the loss weight of each class (``training.balance``).
    class_balance: dict[str, Any] | None = None
    model_file_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The facts that were measured, in field order."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RunFacts:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(eq=False)
class RunRecord:
    """One finished run (module docstring)."""

    run_dir: Path
    #: The resolved config as saved (``ExperimentConfig.to_dict()``); ``None`` when not recorded.
    config: dict[str, Any] | None
    split: SplitRef | None
    metrics: dict[str, Any]
    facts: RunFacts = field(default_factory=RunFacts)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    weights_origin: dict[str, Any] | str | None = None
    predictions: Predictions | None = None
    #: The best weights' calibrated validation probabilities (absent in runs of older releases).
    val_predictions: Predictions | None = None

    @property
    def model_file(self) -> Path:
        return self.run_dir / "model.safetensors"

    @property
    def report(self) -> Path:
        return self.run_dir / "report.md"

    @staticmethod
    def is_finished(run_dir: str | os.PathLike) -> bool:
        return (Path(run_dir) / "model.safetensors").is_file()

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunRecord:
        """Read a run folder; a missing ``predictions.csv`` is an error, other files may be absent."""
        run_dir = Path(run_dir)
        provenance = _read_json(run_dir / "provenance.json")
        config_file = run_dir / "config.yaml"
        return cls(
            run_dir=run_dir,
            config=yaml.safe_load(config_file.read_text()) if config_file.is_file() else None,
            split=SplitRef.read(run_dir / "split.json"),
            metrics=_read_json(run_dir / "metrics.json"),
            facts=RunFacts.from_dict(provenance.get("facts") or {}),
            lineage=list(provenance.get("lineage") or []),
            weights_origin=provenance.get("weights_origin"),
            predictions=Predictions.read(run_dir / "predictions.csv"),
            val_predictions=(Predictions.read(run_dir / VAL_PREDICTIONS)
                             if (run_dir / VAL_PREDICTIONS).is_file() else None),
        )

    def save(self, *, title: str, history: Path | None = None) -> Path:
        """Write predictions.csv and the report folder (``evaluation.report.write_report``: config,
        metrics, provenance, plots, report.md); returns report.md's path."""
        from breastvision.evaluation.report import write_report

        if self.predictions is None:
            raise BreastvisionError("a run record needs its predictions to be saved")
        p = self.predictions
        p.save(self.run_dir / "predictions.csv")
        if self.val_predictions is not None:
            self.val_predictions.save(self.run_dir / VAL_PREDICTIONS)
        return write_report(
            self.run_dir, metrics=self.metrics, config=self.config,
            split_info=self.split.file if self.split else None, weights_origin=self.weights_origin,
            lineage=self.lineage, history=history, class_names=p.class_names, y_true=p.y_true,
            probs=p.probs, facts=self.facts.to_dict(), title=title,
        )

    def differences(self, config: Any) -> list[str]:
        if self.config is None:
            raise BreastvisionError(
                f"{self.run_dir} holds a model but no config.yaml: not a breastvision run"
            )
        return config_differences(self.config, config)

    def matches(self, config: Any) -> bool:
        """Whether this run is what ``config`` would train (:func:`config_differences` is empty)."""
        return not self.differences(config)

    def check_matches(self, config: Any) -> None:
        """Refuse to reuse this run for a ``config`` that would train something else."""
        changed = self.differences(config)
        if changed:
            raise BreastvisionError(
                f"{self.run_dir} was trained with a different configuration ({'; '.join(changed[:3])}); "
                "remove it or choose another --out"
            )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
