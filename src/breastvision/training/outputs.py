"""The run folder a finished training run leaves, with the test part scored by the one predictor
(``serving.predict``: the model file about to be written, run as ``predict`` and ``evaluate`` run
it, so a run's predictions.csv is what they give on the same files): the model file (weights, class names,
pre-processing with the fitted stain normaliser, lineage, validation and test metrics, the
temperature and operating points fitted on validation, the scope of ``models.scope``, the
test-time augmentation set ``--tta`` averages: ``data.tta``, else the training data's modality's,
``models.tta``, which the lineage entry records), the split, and the
:class:`~breastvision.training.run_record.RunRecord` with its report::

    model.safetensors   ModelBundle
    split.json          the split used;  config.yaml  the resolved config
    history.csv         per-epoch train/val loss and accuracy, learning rate, seconds (the loop's)
    report.md, metrics.json, provenance.json, predictions.csv, plots/   (RunRecord.save)
    val_predictions.csv the best weights' calibrated validation probabilities (same format;
                        averaged over ``data.tta``'s views, as the test part is)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.tta import tta_for
from breastvision.training.calibrate import Calibrated
from breastvision.training.checkpoint import LoopState
from breastvision.training.config import ExperimentConfig
from breastvision.training.data_setup import RunData
from breastvision.training.run_record import Predictions, RunFacts, RunRecord, SplitRef

if TYPE_CHECKING:
    from breastvision.serving.predict import Scored


@dataclass
class Trained:
    """What training produced: the model with its best weights loaded, how to pre-process for it,
    the lineage it inherited, the loop's final state, the run's facts, and the fitted calibration,
    operating points and scope."""

    model: nn.Module
    preprocessing: Preprocessing
    inherited_lineage: list[dict[str, Any]]
    state: LoopState
    facts: RunFacts
    calibrated: Calibrated
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
        "modality": data.catalog.meta.get("modality"),
        "split": {"protocol": split.protocol, "leaky": split.leaky, "fold": config.data.fold,
                  "file": str(split.file)},
        "frozen_stages": frozen,
        "trainable_stages": trainable,
        "epochs": trained.facts.epochs_run,
        "best_epoch": trained.state.best["epoch"],
        "checkpoint": str(run_dir / "model.safetensors"),
    }


def _bundle(config: ExperimentConfig, data: RunData, trained: Trained,
            lineage: list[dict[str, Any]]) -> ModelBundle:
    """The model file's bundle; its test headline is added once the test part is scored."""
    model, best = trained.model, trained.state.best
    scores = {"val": {"epoch": best["epoch"], "loss": best["val_loss"], "accuracy": best["val_acc"]}}
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
        tta=config.data.tta or tta_for(data.catalog.meta.get("modality")),
    )


def _val_predictions(data: RunData, trained: Trained) -> Predictions | None:
    if trained.val_probs is None:
        return None
    return Predictions([i.relpath for i in data.val], [i.record.group for i in data.val],
                       np.array([i.record.label for i in data.val]), trained.val_probs, data.class_names,
                       trained.calibrated.operating_points)


def score_test(bundle: ModelBundle, model: nn.Module, data: RunData, config: ExperimentConfig,
               model_file: Path, device: Any,
               render: Callable[[Path, str | None], torch.Tensor] | None = None) -> Scored:
    """The test part through the one predictor, on ``model`` (the bundle's network, in memory):
    calibrated probabilities, scope scores and the probabilities at ``T = 1``; ``render`` prepares
    items the predictor cannot (``engine._draws``). An image that fails now was read in training."""
    from breastvision.serving.predict import TorchPredictor, score_items

    predictor = TorchPredictor(bundle, model_file, device, model=model)
    items = [(t.path, t.view) for t in data.test_targets]
    batch = config.train.eval_batch_size or config.train.batch_size
    scored = score_items(predictor, items, tta=data.eval_tta, batch_size=batch,
                         workers=config.data.num_workers, render=render)
    if scored.failures:
        index, reason = next(iter(sorted(scored.failures.items())))
        raise BreastvisionError(f"test image {items[index][0]} could not be scored: {reason}")
    return scored


def write_outputs(run_dir: Path, config: ExperimentConfig, data: RunData, trained: Trained, device: Any,
                  render: Callable[[Path, str | None], torch.Tensor] | None = None,
                  started: float | None = None) -> RunRecord:
    """Score the test part, write the run folder (module docstring); returns its record. With
    ``started`` (a ``time.perf_counter`` value), the session's wall-clock then includes the
    out-of-scope fit and the test pass, not only the epochs."""
    from breastvision.evaluation.report import HEADLINE, calibration_entry, evaluate_predictions, lookup
    from breastvision.evaluation.subtypes import known_subtypes

    split = SplitRef.read(data.split.save(run_dir / "split.json"))
    assert split is not None
    stage = _stage(config, data, trained, split, run_dir)
    lineage = [*trained.inherited_lineage, stage]
    model_file = run_dir / "model.safetensors"
    bundle = _bundle(config, data, trained, lineage)
    scored = score_test(bundle, trained.model, data, config, model_file, device, render)
    targets = data.test_targets
    y = np.array([t.label for t in targets])
    groups = [t.group for t in targets]
    subtypes = known_subtypes([t.subtype for t in targets])
    operating = trained.calibrated.operating_points
    metrics = evaluate_predictions(y, scored.probs, data.class_names, groups, subtypes=subtypes,
                                   grouping=data.catalog.grouping, seed=config.train.seed,
                                   thresholds=operating["thresholds"] if operating else None)
    calibration = trained.calibrated.calibration
    metrics["calibration"] = calibration_entry(metrics, y, scored.uncalibrated, calibration)
    if trained.segmentation is not None:
        metrics["segmentation"] = trained.segmentation
    test = {k: lookup(metrics, k) for k in HEADLINE if lookup(metrics, k) is not None}
    bundle.metrics["test"] = json.loads(json.dumps(test, default=float))
    bundle.save(model_file)
    trained.facts.model_file_mb = round(model_file.stat().st_size / 2**20, 2)
    if started is not None:
        trained.facts.wall_clock_seconds_this_session = time.perf_counter() - started
    predictions = Predictions([t.key for t in targets], groups, y, scored.probs, data.class_names, operating,
                              scored.scores, None if trained.scope is None else trained.scope.threshold,
                              subtypes)
    record = RunRecord(
        run_dir=run_dir, config=config.to_dict(), split=split, metrics=metrics, facts=trained.facts,
        lineage=lineage, weights_origin=trained.model.weights_origin, predictions=predictions,
        val_predictions=_val_predictions(data, trained),
    )
    # A chain's stage is named "<chain>/<stage>": the stage name would only repeat it.
    named = stage["stage"] in (config.name, config.name.rsplit("/", 1)[-1])
    title = config.name if named else f"{config.name}, stage {stage['stage']}"
    record.save(title=f"{title} ({trained.model.architecture})", history=run_dir / "history.csv")
    return record
