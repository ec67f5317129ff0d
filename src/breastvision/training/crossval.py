"""K-fold cross-validation: one training run per fold, then the folds' test predictions pooled.

:func:`run_crossval` trains ``data.fold = 0 … K-1`` of a k-fold config into ``out/fold<k>``.
A fold whose folder holds ``model.safetensors`` is finished and reused, and one holding only
``checkpoints/last.ckpt`` is resumed, so an interrupted cross-validation continues where it
stopped (and a fold trained by hand with ``breastvision train --out out/fold0`` counts, as long as
its configuration is the same).

:func:`aggregate_runs` pools the out-of-fold test predictions — every image is tested exactly once,
by the model that never saw it — into one metrics dict (``evaluate_predictions``: one confusion
matrix, one AUC and bootstrap intervals over all images, resampling patients when the grouping is a
patient grouping), and also gives the mean ± sd of each fold's own headline metrics. Pooled numbers
are the headline because BUSI's folds hold ~125 images each: a per-fold AUC is noisy, and the mean
of per-fold accuracies weighs a small fold like a large one.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from breastvision.data.records import PATIENT_GROUPINGS
from breastvision.errors import BreastvisionError
from breastvision.paths import file_sha256

log = logging.getLogger(__name__)

#: Headline metrics whose per-fold mean ± sd is reported (dotted paths into a metrics dict).
FOLD_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc", "patient.P_arp")
#: Settings that may differ between a finished fold and the rest of the cross-validation: they
#: change speed and display, not results.
_FREE_KEYS = {
    "train": ("threads", "progress", "num_workers", "cache_backend"),
    "data": ("fold", "num_workers"),
}


def fold_overrides(folds: int, fold: int) -> list[str]:
    return [f"data.split.options.k={folds}", f"data.fold={fold}"]


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a resolved config that must agree across folds."""
    out = json.loads(json.dumps(config, default=str))
    for section, keys in _FREE_KEYS.items():
        for key in keys:
            out.get(section, {}).pop(key, None)
    out.pop("output_dir", None)
    return out


def check_same_setup(run_dir: Path, config: Any) -> None:
    """Refuse to reuse a finished run whose saved configuration differs in anything but speed."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise BreastvisionError(f"{run_dir} holds a model but no config.yaml: not a breastvision run")
    saved = yaml.safe_load(saved_path.read_text())
    if _comparable(saved) != _comparable(config.to_dict()):
        raise BreastvisionError(
            f"{run_dir} was trained with a different configuration; remove it or choose another --out"
        )


def train_or_reuse(config: Any, run_dir: Path, label: str) -> Path:
    """Train ``config`` into ``run_dir`` unless a finished run of the same setup is there (reused,
    see ``check_same_setup``); an interrupted one (``checkpoints/last.ckpt``) is resumed. ``label``
    names the run in the log. Returns ``run_dir``."""
    from breastvision.training.engine import train

    last = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "model.safetensors").is_file():
        check_same_setup(run_dir, config)
        log.info(f"{label}: finished already ({run_dir})")
    else:
        log.info(f"{label}: {'resuming' if last.is_file() else 'training'} in {run_dir}")
        train(config, resume=last if last.is_file() else None, out=run_dir)
    return run_dir


def run_crossval(
    config_path: str | os.PathLike,
    folds: int = 5,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Train every fold of a ``group_kfold`` config (finished folds reused) and write the pooled
    report into ``out`` (default: the config's run folder). Returns ``out``."""
    from breastvision.training.config import load_config

    if folds < 2:
        raise BreastvisionError(f"cross-validation needs at least 2 folds (got {folds})")
    first = load_config(config_path, [*overrides, *fold_overrides(folds, 0)])
    if first.data.split.file is None and first.data.split.protocol != "group_kfold":
        raise BreastvisionError(
            f"{config_path}: cross-validation needs data.split.protocol group_kfold "
            f"(got {first.data.split.protocol}); add --set data.split.protocol=group_kfold"
        )
    out_dir = Path(out).expanduser() if out is not None else first.run_dir
    run_dirs = [
        train_or_reuse(
            load_config(config_path, [*overrides, *fold_overrides(folds, fold)]),
            out_dir / f"fold{fold}",
            f"fold {fold}/{folds}",
        )
        for fold in range(folds)
    ]
    aggregate_runs(run_dirs, out_dir, title=title or f"{first.name}: {folds}-fold cross-validation")
    return out_dir


def read_predictions(run_dir: Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray, list[str]]:
    """A run's ``predictions.csv``: keys, groups, true labels (indices), probabilities, class names."""
    path = run_dir / "predictions.csv"
    if not path.is_file():
        raise BreastvisionError(f"{run_dir} has no predictions.csv: not a finished run")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise BreastvisionError(f"{path} holds no predictions")
    names = [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")]
    unknown = {r["true_label"] for r in rows} - set(names)
    if unknown:
        raise BreastvisionError(f"{path}: labels {sorted(unknown)} have no probability column")
    probs = np.array([[float(r[f"prob_{c}"]) for c in names] for r in rows])
    labels = np.array([names.index(r["true_label"]) for r in rows])
    return [r["path"] for r in rows], [r["group"] for r in rows], labels, probs, names


def _mean_sd(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    # Sample standard deviation: the folds are a sample of the splits one could have drawn.
    sd = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
    return {"mean": float(np.mean(present)), "sd": sd, "n": len(present)}


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def aggregate_runs(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    title: str = "cross-validation",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Pool the runs' test predictions into one report folder (``out_dir``) and return a summary.

    The runs must test disjoint images (the folds of one cross-validation); their class lists must
    agree. The summary (also ``crossval.json``) holds ``pooled`` (``evaluate_predictions``' dict),
    ``per_fold`` (each fold's headline metrics, split file hash, wall-clock), ``mean_sd``
    and ``wall_clock_seconds`` (the sum of the folds' training sessions).
    """
    from breastvision.evaluation.report import (
        evaluate_predictions,
        lookup,
        markdown_table,
        write_predictions_csv,
        write_report,
    )

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise BreastvisionError("aggregate_runs needs at least one run folder")
    keys: list[str] = []
    groups: list[str] = []
    labels, probs = [], []
    names: list[str] | None = None
    per_fold: list[dict[str, Any]] = []
    groupings = set()
    for run_dir in dirs:
        k, g, y, p, fold_names = read_predictions(run_dir)
        if names is not None and fold_names != names:
            raise BreastvisionError(f"{run_dir} has classes {fold_names}, the other runs {names}")
        names = fold_names
        keys += k
        groups += g
        labels.append(y)
        probs.append(p)
        split = _json(run_dir / "split.json")
        groupings.add(split.get("grouping"))
        metrics = _json(run_dir / "metrics.json")
        facts = _json(run_dir / "provenance.json").get("facts", {})
        per_fold.append({
            "run_dir": str(run_dir),
            "n_test": len(k),
            "split_sha256": file_sha256(run_dir / "split.json") if split else None,
            "split_protocol": split.get("protocol"),
            "leaky": split.get("leaky"),
            "wall_clock_seconds": facts.get("wall_clock_seconds_this_session"),
            "best_epoch": facts.get("best_epoch"),
            **{m: lookup(metrics, m) for m in FOLD_METRICS},
        })
    repeated = len(keys) - len(set(keys))
    if repeated:
        raise BreastvisionError(
            f"{repeated} test images appear in more than one run: pooling needs disjoint test sets (folds)"
        )
    assert names is not None
    y_all = np.concatenate(labels)
    p_all = np.concatenate(probs)
    patient_groups = groups if groupings <= PATIENT_GROUPINGS else None  # a run without split.json adds None
    pooled = evaluate_predictions(y_all, p_all, names, patient_groups, n_resamples=n_resamples, seed=seed)
    mean_sd = {m: _mean_sd([f[m] for f in per_fold]) for m in FOLD_METRICS}
    mean_sd = {m: v for m, v in mean_sd.items() if v is not None}
    times = [f["wall_clock_seconds"] for f in per_fold if f["wall_clock_seconds"] is not None]
    wall = float(sum(times)) if times else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", keys, y_all, p_all, names, groups)
    hashes = {f["split_sha256"] for f in per_fold}
    # One split file serves every fold of a k-fold split: copy it into the report when they agree.
    shared_split = dirs[0] / "split.json" if len(hashes) == 1 and None not in hashes else None
    facts = {
        "folds": len(dirs),
        "images pooled": len(keys),
        "wall-clock, sum of the folds' training sessions (s)": round(wall, 1) if wall is not None else None,
        "aggregated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    report = write_report(
        out,
        metrics=pooled,
        config=dirs[0] / "config.yaml" if (dirs[0] / "config.yaml").is_file() else None,
        split_info=shared_split,
        weights_origin=_json(dirs[0] / "provenance.json").get("weights_origin"),
        class_names=names,
        y_true=y_all,
        probs=p_all,
        facts=facts,
        title=title,
    )
    shown = [m for m in FOLD_METRICS if m in mean_sd]  # no patient column without patients
    header = ["fold", "run folder", "test images", "split SHA-256", "best epoch", "seconds", *shown]
    rows = [[i, f["run_dir"], f["n_test"], f["split_sha256"], f["best_epoch"],
             _seconds(f["wall_clock_seconds"]), *(f[m] for m in shown)] for i, f in enumerate(per_fold)]
    spread = ["mean ± sd", "", sum(f["n_test"] for f in per_fold), "", "", _seconds(wall),
              *(f"{mean_sd[m]['mean']:.3f} ± {mean_sd[m]['sd']:.3f}" for m in shown)]
    folds_section = (
        "## Folds\n\nThe metrics above pool every fold's out-of-fold test predictions "
        "([predictions.csv](predictions.csv)); each fold's own numbers, and their mean ± sample sd:\n\n"
        + markdown_table(header, [*rows, spread])
    )
    report.write_text(report.read_text() + "\n" + folds_section + "\n")
    summary = {
        "title": title,
        "class_names": names,
        "pooled": pooled,
        "per_fold": per_fold,
        "mean_sd": mean_sd,
        "wall_clock_seconds": wall,
    }
    (out / "crossval.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary
