"""The run folder a finished training run leaves: the model file (weights, class names,
pre-processing with the fitted stain normaliser, lineage, validation and test metrics, the
temperature and operating points fitted on validation, the scope of ``models.scope``), the split,
and the :class:`~breastvision.training.run_record.RunRecord` with its report::

    model.safetensors   ModelBundle
    split.json          the split used;  config.yaml  the resolved config
    history.csv         per-epoch train/val loss and accuracy, learning rate, seconds (the loop's)
    report.md, metrics.json, provenance.json, predictions.csv, plots/   (RunRecord.save)
    val_predictions.csv the best weights' calibrated validation probabilities (same format)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.training.calibrate import Calibrated
from breastvision.training.checkpoint import LoopState
from breastvision.training.config import ExperimentConfig
from breastvision.training.data_setup import RunData
from breastvision.training.run_record import Predictions, RunFacts, RunRecord, SplitRef


@dataclass
class Trained:
    """What training produced: the model with its best weights loaded, how to pre-process for it,
    the lineage it inherited, the loop's final state, the calibrated test probabilities (one row
    per test target), the run's facts, the fitted calibration and operating points, and the test
    probabilities before calibration."""

    model: nn.Module
    preprocessing: Preprocessing
    inherited_lineage: list[dict[str, Any]]
    state: LoopState
    probs: np.ndarray
    facts: RunFacts
    calibrated: Calibrated
    uncalibrated_probs: np.ndarray
    #: ``models.scope.Scope`` fitted on the training images (``None``: not fitted).
    scope: Any = None
    #: Calibrated probabilities of the validation items at the best epoch (``val_predictions.csv``:
    #: what recipes are compared on, never the test part).
    val_probs: np.ndarray | None = None
    #: The mask head's Dice on the test views (``training.segmentation.mask_dice``; mask-guided runs).
    segmentation: dict[str, Any] | None = None


def _stage(config: ExperimentConfig, data: RunData, trained: Trained, split: SplitRef,
           run_dir: Path) -> dict[str, Any]:
    """This run's lineage entry: where its weights started, on what data, what was frozen."""
    from breastvision.models.staging import split_stage_names

    model = trained.model
    frozen, trainable = split_stage_names(model, config.model.first_trainable_stage)
    return {
        "stage": config.stage or config.name,
        "weights": dict(model.weights_origin),  # each part: file and SHA-256, or random init
        "data": f"{data.catalog.name} ({config.data.source})",
        "split": {"protocol": split.protocol, "leaky": split.leaky, "fold": config.data.fold,
                  "file": str(split.file)},
        "frozen_stages": frozen,
        "trainable_stages": trainable,
        "epochs": trained.facts.epochs_run,
        "best_epoch": trained.state.best["epoch"],
        "checkpoint": str(run_dir / "model.safetensors"),
    }


def _bundle(config: ExperimentConfig, data: RunData, trained: Trained, lineage: list[dict[str, Any]],
            metrics: dict[str, Any]) -> ModelBundle:
    from breastvision.evaluation.report import HEADLINE, lookup

    model, best = trained.model, trained.state.best
    headline = {k: lookup(metrics, k) for k in HEADLINE if lookup(metrics, k) is not None}
    scores = {"val": {"epoch": best["epoch"], "loss": best["val_loss"], "accuracy": best["val_acc"]},
              "test": headline}
    return ModelBundle(
        architecture=model.architecture,
        class_names=data.class_names,
        state_dict=model.state_dict(),
        model_kwargs=dict(model.model_kwargs),
        preprocessing=trained.preprocessing,
        lineage=json.loads(json.dumps(lineage, default=str)),
        metrics=json.loads(json.dumps(scores, default=float)),
        extra={"weights_origin": model.weights_origin, "config_name": config.name},
        calibration=trained.calibrated.calibration,
        operating_points=trained.calibrated.operating_points,
        scope=trained.scope,
    )


def _val_predictions(data: RunData, trained: Trained) -> Predictions | None:
    if trained.val_probs is None:
        return None
    return Predictions([i.relpath for i in data.val], [i.record.group for i in data.val],
                       np.array([i.record.label for i in data.val]), trained.val_probs, data.class_names)


def write_outputs(run_dir: Path, config: ExperimentConfig, data: RunData, trained: Trained) -> RunRecord:
    """Score the test predictions and write the run folder (module docstring); returns its record."""
    from breastvision.evaluation.calibration import expected_calibration_error
    from breastvision.evaluation.report import evaluate_predictions

    split = SplitRef.read(data.split.save(run_dir / "split.json"))
    assert split is not None
    targets = data.test_targets
    y = np.array([t.label for t in targets])
    groups = [t.group for t in targets]
    operating = trained.calibrated.operating_points
    metrics = evaluate_predictions(y, trained.probs, data.class_names, groups,
                                   grouping=data.catalog.grouping, seed=config.train.seed,
                                   thresholds=operating["thresholds"] if operating else None)
    metrics["calibration"] = {"temperature": trained.calibrated.temperature,
                              "ece_uncalibrated": expected_calibration_error(y, trained.uncalibrated_probs)}
    if trained.segmentation is not None:
        metrics["segmentation"] = trained.segmentation
    stage = _stage(config, data, trained, split, run_dir)
    lineage = [*trained.inherited_lineage, stage]
    model_file = run_dir / "model.safetensors"
    _bundle(config, data, trained, lineage, metrics).save(model_file)
    trained.facts.model_file_mb = round(model_file.stat().st_size / 2**20, 2)
    record = RunRecord(
        run_dir=run_dir, config=config.to_dict(), split=split, metrics=metrics, facts=trained.facts,
        lineage=lineage, weights_origin=trained.model.weights_origin,
        predictions=Predictions([t.key for t in targets], groups, y, trained.probs, data.class_names),
        val_predictions=_val_predictions(data, trained),
    )
    # A chain's stage is named "<chain>/<stage>": the stage name would only repeat it.
    named = stage["stage"] in (config.name, config.name.rsplit("/", 1)[-1])
    title = config.name if named else f"{config.name}, stage {stage['stage']}"
    record.save(title=f"{title} ({trained.model.architecture})", history=run_dir / "history.csv")
    return record
