"""K-fold cross-validation: one training run per fold, then the folds' test predictions pooled.

:func:`run_crossval` trains ``data.fold = 0 … K-1`` of a k-fold config into ``out/fold<k>``.
A fold whose folder holds ``model.safetensors`` is finished and reused, and one holding only
``checkpoints/last.ckpt`` is resumed, so an interrupted cross-validation continues where it
stopped (and a fold trained by hand with ``breastvision train --out out/fold0`` counts, as long as
its configuration is the same: ``RunRecord.check_matches``).

:func:`aggregate_runs` pools the out-of-fold test predictions — every image is tested exactly once,
by the model that never saw it — into one metrics dict (``evaluate_predictions``: one confusion
matrix, one AUC and bootstrap intervals over all images, resampling patients when the grouping is a
patient grouping), and also gives the mean ± sd of each fold's own headline metrics. Pooled numbers
are the headline because folds of a data set this size are small: a per-fold AUC is noisy, and the
mean of per-fold accuracies weighs a small fold like a large one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from breastvision.data.records import PATIENT_GROUPINGS
from breastvision.errors import BreastvisionError
from breastvision.training.run_record import Predictions, RunRecord

log = logging.getLogger(__name__)

#: Headline metrics whose per-fold mean ± sd is reported (dotted paths into a metrics dict).
#: ``calibration.ece_uncalibrated`` beside ``ece``: each fold's ECE on its held-out test part before and
#: after the temperature fitted on its validation part.
FOLD_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc", "patient.P_arp",
                "calibration.ece_uncalibrated", "ece", "segmentation.dice", "segmentation.dice_lesion")


def fold_overrides(folds: int, fold: int) -> list[str]:
    return [f"data.split.options.k={folds}", f"data.fold={fold}"]


def train_or_reuse(config: Any, run_dir: Path, label: str) -> RunRecord:
    """Train ``config`` into ``run_dir`` unless a finished run of the same config is there (reused;
    one of another config is an error, ``RunRecord.check_matches``); an interrupted one
    (``checkpoints/last.ckpt``) is resumed. ``label`` names the run in the log."""
    from breastvision.training.engine import train

    if RunRecord.is_finished(run_dir):
        record = RunRecord.load(run_dir)
        record.check_matches(config)
        log.info(f"{label}: finished already ({run_dir})")
        return record
    last = run_dir / "checkpoints" / "last.ckpt"
    log.info(f"{label}: {'resuming' if last.is_file() else 'training'} in {run_dir}")
    train(config, resume=last if last.is_file() else None, out=run_dir)
    return RunRecord.load(run_dir)


@dataclass
class CrossValidation:
    """A finished cross-validation: the folder of the pooled report, the folds' runs and
    :func:`aggregate_runs`' summary."""

    out_dir: Path
    runs: list[RunRecord]
    summary: dict[str, Any]


def run_crossval(
    config_path: str | os.PathLike,
    folds: int = 5,
    overrides: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    *,
    title: str | None = None,
    ensemble: bool = False,
) -> CrossValidation:
    """Train every fold of a ``group_kfold`` config (finished folds reused) and write the pooled
    report into ``out`` (default: the config's run folder); with ``ensemble``, also
    ``out/ensemble.safetensors`` of the k fold models (``models.ensemble``). That file is for use,
    not for scoring on these folds: every image is in some member's training data.

    A transfer chain (``transfer``'s YAML, with ``stages``) is cross-validated on its last stage:
    per fold the chain runs into ``out`` (its earlier stages do not depend on the fold, so they are
    trained once, in ``out/<stage>``, and reused), and the last stages' folds
    (``out/<stage>_fold<k>``) are pooled."""
    from breastvision.training.config import load_config
    from breastvision.training.transfer import is_chain

    if folds < 2:
        raise BreastvisionError(f"cross-validation needs at least 2 folds (got {folds})")
    if is_chain(config_path):
        first, chain_of, out = chain_folds(config_path, folds, overrides, out)

        def run_fold(fold: int) -> RunRecord:
            return chain_of(fold)[-1]
    else:
        first = load_config(config_path, [*overrides, *fold_overrides(folds, 0)])

        def run_fold(fold: int) -> RunRecord:
            config = load_config(config_path, [*overrides, *fold_overrides(folds, fold)])
            return train_or_reuse(config, out_dir / f"fold{fold}", f"fold {fold}/{folds}")
    if first.data.split.file is None and first.data.split.protocol != "group_kfold":
        raise BreastvisionError(
            f"{config_path}: cross-validation needs data.split.protocol group_kfold "
            f"(got {first.data.split.protocol}); add --set data.split.protocol=group_kfold"
        )
    out_dir = Path(out).expanduser() if out is not None else first.run_dir
    runs = [run_fold(fold) for fold in range(folds)]
    summary = aggregate_runs(runs, out_dir, title=title or f"{first.name}: {folds}-fold cross-validation")
    if ensemble:
        from breastvision.models.ensemble import ENSEMBLE_FILE_NAME, ensemble_files

        ensemble_files([run.run_dir for run in runs], out_dir / ENSEMBLE_FILE_NAME)
    return CrossValidation(out_dir, runs, summary)


def chain_folds(
    path: str | os.PathLike, folds: int, overrides: Sequence[str], out: str | os.PathLike | None
) -> tuple[Any, Callable[[int], list[RunRecord]], Path]:
    """For a chain cross-validated on its last stage: that stage's config at fold 0 (to check the
    split), a function that runs the chain for one fold and returns every stage's record, and the
    folder of its stages (``out``, default the chain's ``output_dir``; :func:`run_crossval`)."""
    from breastvision.training.transfer import load_chain, run_chain, stage_configs

    chain = load_chain(path)
    last = chain.stages[-1].name
    out = Path(out).expanduser() if out is not None else Path(chain.output_dir.format(name=chain.name))

    def fold_of(fold: int) -> list[str]:
        return [*overrides, *(f"{last}.{item}" for item in fold_overrides(folds, fold))]

    def run(fold: int) -> list[RunRecord]:
        log.info(f"fold {fold}/{folds}: chain {path}")
        return run_chain(path, fold_of(fold), out)

    return stage_configs(path, fold_of(0), out)[-1], run, out


def _mean_sd(values: Sequence[float | None]) -> dict[str, float] | None:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    # Sample standard deviation: the folds are a sample of the splits one could have drawn.
    sd = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
    return {"mean": float(np.mean(present)), "sd": sd, "n": len(present)}


def _seconds(value: float | None) -> str | None:
    return None if value is None else f"{value:.0f}"


def _pool(runs: Sequence[RunRecord]) -> Predictions:
    """Concatenate the runs' predictions (each fold's decisions were at its own operating points, so
    the pooled table has none); their classes must agree and their test images differ."""
    parts = [r.predictions for r in runs]
    names = parts[0].class_names
    for run, part in zip(runs, parts, strict=True):
        if part.class_names != names:
            raise BreastvisionError(f"{run.run_dir} has classes {part.class_names}, the other runs {names}")
    keys = [k for p in parts for k in p.keys]
    repeated = len(keys) - len(set(keys))
    if repeated:
        raise BreastvisionError(
            f"{repeated} test images appear in more than one run: pooling needs disjoint test sets (folds)"
        )
    # Subtypes only when every fold has them: a half-filled column would skew the per-subtype recall.
    subtypes = None if any(p.subtypes is None for p in parts) else [s for p in parts for s in p.subtypes]
    return Predictions(keys, [g for p in parts for g in p.groups], np.concatenate([p.y_true for p in parts]),
                       np.concatenate([p.probs for p in parts]), names, subtypes=subtypes)


def _fold_row(run: RunRecord) -> dict[str, Any]:
    from breastvision.evaluation.report import lookup

    split = run.split
    return {
        "run_dir": str(run.run_dir),
        "n_test": len(run.predictions.keys),
        "split_sha256": split.sha256 if split else None,
        "split_protocol": split.protocol if split else None,
        "leaky": split.leaky if split else None,
        "wall_clock_seconds": run.facts.wall_clock_seconds_this_session,
        "best_epoch": run.facts.best_epoch,
        **{m: lookup(run.metrics, m) for m in FOLD_METRICS},
    }


def _folds_section(per_fold: list[dict[str, Any]], mean_sd: dict[str, Any], wall: float | None) -> str:
    from breastvision.evaluation.report import markdown_table

    shown = [m for m in FOLD_METRICS if m in mean_sd]  # no patient column without patients
    header = ["fold", "run folder", "test images", "split SHA-256", "best epoch", "seconds", *shown]
    rows = [[i, f["run_dir"], f["n_test"], f["split_sha256"], f["best_epoch"],
             _seconds(f["wall_clock_seconds"]), *(f[m] for m in shown)] for i, f in enumerate(per_fold)]
    spread = ["mean ± sd", "", sum(f["n_test"] for f in per_fold), "", "", _seconds(wall),
              *(f"{mean_sd[m]['mean']:.3f} ± {mean_sd[m]['sd']:.3f}" for m in shown)]
    return (
        "## Folds\n\nThe metrics above pool every fold's out-of-fold test predictions "
        "([predictions.csv](predictions.csv)); each fold's own numbers, and their mean ± sample sd:\n\n"
        + markdown_table(header, [*rows, spread])
    )


def pooled_validation(records: Sequence[RunRecord]) -> Predictions | None:
    """The folds' validation predictions in one ``Predictions`` (keys ``<fold>/<image>``, each fold in
    sorted image order, so two recipes' pools align row by row); ``None`` when a run has none."""
    parts = [r.val_predictions for r in records]
    if any(p is None for p in parts):
        return None
    keys, groups, labels, probs = [], [], [], []
    for fold, val in enumerate(parts):
        order = np.argsort(np.asarray(val.keys, dtype=str), kind="stable")
        keys += [f"{fold}/{val.keys[i]}" for i in order]
        groups += [val.groups[i] for i in order]
        labels.append(np.asarray(val.y_true)[order])
        probs.append(np.asarray(val.probs)[order])
    return Predictions(keys, groups, np.concatenate(labels), np.concatenate(probs), parts[0].class_names)


def _validation_summary(records: Sequence[RunRecord]) -> dict[str, Any] | None:
    """The pooled validation predictions' metrics (no intervals): what recipes are chosen on. A
    validation image may serve several folds, so this is a mean over folds, not a held-out score."""
    from breastvision.evaluation.report import evaluate_predictions

    pooled = pooled_validation(records)
    if pooled is None:
        return None
    metrics = evaluate_predictions(pooled.y_true, pooled.probs, pooled.class_names, grouping=None,
                                   n_resamples=0)
    keep = ("n_images", "accuracy", "recall_macro", "f1_macro", "auc", "ece", "brier")
    return {**{k: metrics[k] for k in keep if k in metrics},
            "recall": {c: v["recall"] for c, v in metrics["per_class"].items()}}


def pooled_grouping(records: Sequence[RunRecord]) -> str | None:
    """The grouping the pooled bootstrap resamples by. Folds of one cross-validation share one; runs
    mixing patient groupings still resample patients, any other mix (or a run without split.json)
    single images."""
    groupings = {r.split.grouping if r.split else None for r in records}
    if len(groupings) == 1:
        return next(iter(groupings))
    return "patient" if groupings <= PATIENT_GROUPINGS else None


def aggregate_runs(
    runs: Sequence[RunRecord | str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    title: str = "cross-validation",
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Pool the runs' test predictions into one report folder (``out_dir``) and return a summary.

    The runs (records or run folders) must test disjoint images (the folds of one
    cross-validation); their class lists must agree. The summary (also ``crossval.json``) holds
    ``pooled`` (``evaluate_predictions``' dict), ``per_fold`` (each fold's headline metrics, split
    file hash, wall-clock), ``mean_sd``, ``wall_clock_seconds`` (the sum of the folds' training
    sessions) and ``validation`` (:func:`_validation_summary`; ``None`` when a run has no
    validation predictions).
    """
    from breastvision.evaluation.report import evaluate_predictions, write_report

    records = [r if isinstance(r, RunRecord) else RunRecord.load(r) for r in runs]
    if not records:
        raise BreastvisionError("aggregate_runs needs at least one run folder")
    pooled = _pool(records)
    metrics = evaluate_predictions(pooled.y_true, pooled.probs, pooled.class_names, pooled.groups,
                                   grouping=pooled_grouping(records), subtypes=pooled.subtypes,
                                   n_resamples=n_resamples, seed=seed)
    dice = [r.metrics.get("segmentation") for r in records]
    if all(dice):  # mask-guided folds: the Dice of all their test views (disjoint, like the predictions)
        from breastvision.evaluation.segmentation import pool_dice

        metrics["segmentation"] = pool_dice(dice)
    per_fold = [_fold_row(r) for r in records]
    mean_sd = {m: v for m in FOLD_METRICS if (v := _mean_sd([f[m] for f in per_fold])) is not None}
    times = [f["wall_clock_seconds"] for f in per_fold if f["wall_clock_seconds"] is not None]
    wall = float(sum(times)) if times else None

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pooled.save(out / "predictions.csv")
    hashes = {f["split_sha256"] for f in per_fold}
    # One split file serves every fold of a k-fold split: copy it into the report when they agree.
    shared_split = records[0].split.file if len(hashes) == 1 and None not in hashes else None
    facts = {
        "folds": len(records),
        "images pooled": len(pooled.keys),
        "wall-clock, sum of the folds' training sessions (s)": round(wall, 1) if wall is not None else None,
        "aggregated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_report(
        out, metrics=metrics, config=records[0].config, split_info=shared_split,
        weights_origin=records[0].weights_origin, class_names=pooled.class_names, y_true=pooled.y_true,
        probs=pooled.probs, facts=facts, title=title,
        extra_sections=[_folds_section(per_fold, mean_sd, wall)],
    )
    summary = {"title": title, "class_names": pooled.class_names, "pooled": metrics, "per_fold": per_fold,
               "mean_sd": mean_sd, "wall_clock_seconds": wall, "validation": _validation_summary(records)}
    (out / "crossval.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary
