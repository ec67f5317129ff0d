"""``breastvision evaluate MODEL SOURCE``: a saved model file on any dataset, folder or manifest.

The command's arguments are declared in ``evaluation.cli``, which imports this module only when
the command runs (torch and numpy are slow to import; ``breastvision --help`` should not wait).

Images are scored by the one predictor (``serving.predict``: the model file's pre-processing,
fitted stain normaliser included, optional TTA (``--tta``: the model file's own view set, or
``--tta-views``), ``--device``, calibrated probabilities, decisions at
the stored operating points, the out-of-scope flag), exactly as ``predict`` scores them, so the
same command scores the test split of a training run, held-out patients or
another hospital's images. Labels are matched to the model's classes *by name*, never by index:
an external folder listing its classes in another order still scores correctly, and a class the
model never learnt is refused. A dataset holding only some of the model's classes is fine (AUC
of the missing ones is undefined and says so; patient-level metrics still apply).

Patient-level metrics are used when the dataset's groups are patients or slides (BreakHis: one
slide per patient; a manifest's ``patient`` / ``patient_id`` column); other groupings, such as
BUSI's near-duplicate groups, are not patients, so those runs report image-level metrics only
unless ``--patient-level on`` says the groups are patients. The bootstrap resamples whole groups
whatever they are (patients, near-duplicate groups); only image grouping resamples images.
``--patient-context W`` blends each image's probabilities with its patient's mean
(``evaluation.context``; W chosen on validation folds, e.g. by an ablation plan's ``context`` step)
and needs patient groups.

Files the readers skip, and images that pass their header check but cannot be decoded (truncated
pixel data) or prepared, are listed in the report folder's ``skipped.csv`` and named in the log;
the rest of the run completes. A model file with a temperature is reported before and after it (ECE
and Brier of the same probabilities at ``T = 1``).

With ``--split``, the dataset is read with the options the split was made with, its file list is
checked against the split's hash, and one part (``--subset``, ``--fold`` for k-fold splits) is
evaluated. Splits drawn after offline dihedral augmentation (paper 000 read literally) evaluate
each (image, view) pair of the part, as the paper did.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from breastvision.data.records import PATIENT_GROUPINGS, Catalog, Record, Skipped
from breastvision.data.splits import Split
from breastvision.devices import resolve_device
from breastvision.errors import BreastvisionError

if TYPE_CHECKING:
    from breastvision.models.bundle import ModelBundle
    from breastvision.serving.predict import Predictor, Scored

log = logging.getLogger(__name__)

#: Skipped files named one by one in the log; the report's ``skipped.csv`` lists them all.
SKIPPED_SHOWN = 20


def class_mapping(data_classes: Sequence[str], model_classes: Sequence[str], used: set[int]) -> np.ndarray:
    """Index map from the dataset's class indices to the model's, matched by case-insensitive name.

    Only classes that actually have images (``used``) must be known to the model.
    """
    model_index = {c.strip().lower(): i for i, c in enumerate(model_classes)}
    unknown = [data_classes[k] for k in sorted(used) if data_classes[k].strip().lower() not in model_index]
    if unknown:
        raise BreastvisionError(
            f"the data has classes the model does not know: {unknown} (model classes: {list(model_classes)})"
        )
    return np.array([model_index.get(c.strip().lower(), -1) for c in data_classes])


def select_items(
    catalog: Catalog, split: Split | None, subset: str, fold: int | None
) -> tuple[list[Record], list[str | None]]:
    """The records to evaluate and the view of each (``None``: the image as stored)."""
    if split is None:
        return list(catalog.records), [None] * len(catalog)
    from breastvision.data.transforms import DIHEDRAL_8

    items = split.subset(catalog, subset, fold)
    records = [i.record for i in items]
    views = [i.view for i in items]
    random_views = sorted({v for v in views if v is not None and v not in DIHEDRAL_8})
    if random_views:
        raise BreastvisionError(
            f"split '{split.protocol}' assigns random augmented views ({', '.join(random_views)}), which "
            "only its training run can regenerate; evaluate a split without views instead"
        )
    return records, views


def _without(items: Sequence[Any], dropped: dict[int, str]) -> list[Any]:
    return [item for index, item in enumerate(items) if index not in dropped]


def _list_skipped(skipped: Sequence[Skipped], listing: Path) -> None:
    """One warning per skipped file up to :data:`SKIPPED_SHOWN`, then a count; all are in ``listing``."""
    for entry in skipped[:SKIPPED_SHOWN]:
        log.warning("skipped %s: %s", entry.path, entry.reason)
    if len(skipped) > SKIPPED_SHOWN:
        log.warning("skipped %d more files; every skipped file is listed in %s", len(skipped) - SKIPPED_SHOWN,
                    listing)


def _use_patients(choice: str, grouping: str) -> bool:
    return choice == "on" or (choice == "auto" and grouping in PATIENT_GROUPINGS)


def _in_context(scored: Scored, records: Sequence[Record], weight: float, patients: bool) -> Scored:
    """``scored`` with every image blended with its patient's mean (``evaluation.context``)."""
    import dataclasses

    from breastvision.evaluation.context import with_patient_context

    if not weight:
        return scored
    if not patients:
        raise BreastvisionError("--patient-context needs images grouped by patient: these groups are not "
                                "patients (--patient-level on says they are)")
    groups = [r.group for r in records]
    return dataclasses.replace(scored, probs=with_patient_context(scored.probs, groups, weight),
                               uncalibrated=with_patient_context(scored.uncalibrated, groups, weight))


@dataclass
class Evaluation:
    """What :func:`evaluate_model` measured and where it wrote the report folder; ``skipped`` lists
    the files not evaluated (the readers' skips, then images that could not be decoded)."""

    metrics: dict[str, Any]
    out_dir: Path
    report: Path
    n_images: int
    skipped: list[Skipped]


@dataclass
class _Inputs:
    predictor: Predictor
    catalog: Catalog
    records: list[Record]
    views: list[str | None]

    @property
    def bundle(self) -> ModelBundle:
        return self.predictor.info


def _inputs(model: Path, source: str, data: str | None, split_file: Path | None, subset: str,
            fold: int | None, device: str, operating_point: str | None) -> _Inputs:
    from breastvision.data.readers import read_dataset
    from breastvision.serving.predict import load_predictor

    if fold is not None and split_file is None:
        raise BreastvisionError("--fold needs --split")
    # A model file whose weights do not fit, or an unknown operating point, fails before any data is read.
    predictor = load_predictor(model, device, operating_point)
    split = Split.load(split_file) if split_file else None
    # A split is checked against the file list it was made for: read with the same options.
    options = split.params.get("read_options", {}) if split else {}
    catalog = read_dataset(source, root=data, **options)
    records, views = select_items(catalog, split, subset, fold)
    if not records:
        part = f" (part {subset!r} of {split_file})" if split_file else ""
        raise BreastvisionError(f"no images to evaluate in {source}{part}")
    return _Inputs(predictor, catalog, records, views)


def _score(inputs: _Inputs, *, tta: str | None, batch_size: int, workers: int, progress: bool) -> Scored:
    """The predictor over the records' (file, view) pairs; a one-line error when none could be read."""
    from breastvision.serving.predict import score_items
    from breastvision.training.progress import progress_bar

    items = list(zip([r.path for r in inputs.records], inputs.views, strict=True))
    with progress_bar(None, -(-len(items) // batch_size), "evaluating", progress) as bar:
        scored = score_items(inputs.predictor, items, tta=tta, batch_size=batch_size, workers=workers,
                             on_batch=lambda _: bar.advance())
    if len(scored.failures) == len(items):
        first = min(scored.failures)
        raise BreastvisionError(f"no images to predict: none of the {len(items)} could be read, "
                                f"e.g. {items[first][0]}: {scored.failures[first]}")
    return scored


def _record(inputs: _Inputs, model_path: Path, settings: dict[str, Any], seconds: float,
            unreadable: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What the report says about the evaluation: its configuration, facts and weights' origin."""
    from breastvision.data.transforms import describe_tta
    from breastvision.paths import file_sha256

    bundle, catalog, n = inputs.bundle, inputs.catalog, len(inputs.records)
    model_sha = file_sha256(model_path)
    config = {"command": "evaluate", "model": str(model_path), "model_sha256": model_sha,
              "source": settings["source"], "data_root": str(catalog.root),
              "read_options": catalog.meta.get("read_options", {}), **settings,
              "model_file": {k: v for k, v in bundle.metadata().items() if k != "metrics"}}
    patients = settings["patient_level"]
    network = getattr(inputs.predictor, "model", None)  # an ONNX export has no PyTorch module
    facts = {
        "parameters": sum(p.numel() for p in network.parameters()) if network is not None else None,
        "backend": inputs.predictor.backend,
        "model file size (MB)": round(model_path.stat().st_size / 2**20, 2),
        "inference time (s)": round(seconds, 2),
        "images / s": round(n / seconds, 1) if seconds > 0 else None,
        "device": settings["device"],
        "test-time augmentation": describe_tta(settings["tta"]),
        "files skipped by the reader": len(catalog.skipped),
        "images that could not be decoded": unreadable,
        "patient-level metrics": f"yes (groups: {catalog.grouping})" if patients
        else f"no (groups: {catalog.grouping}, not patients)",
    }
    origin = {"model file": f"{model_path} (sha256 {model_sha[:16]}…)",
              **bundle.extra.get("weights_origin", {})}
    return config, facts, origin


def _write_listings(out_dir: Path, inputs: _Inputs, y_true: np.ndarray, scored: Scored,
                    skipped: list[Skipped]) -> None:
    """predictions.csv (``serving.predict.write_predictions_csv``; names relative to the dataset
    root, ``::view`` when there is one) and skipped.csv, each file named in the log up to
    :data:`SKIPPED_SHOWN`."""
    from breastvision.evaluation.report import write_skipped_csv
    from breastvision.serving.predict import write_predictions_csv

    catalog, judge, names = inputs.catalog, inputs.predictor.judge, inputs.bundle.class_names
    rows = []
    for i, (record, view) in enumerate(zip(inputs.records, inputs.views, strict=True)):
        shown = catalog.relpath(record) if record.path.is_relative_to(catalog.root) else str(record.path)
        score = None if scored.scores is None else scored.scores[i]
        rows.append(judge(shown if view is None else f"{shown}::{view}", record.path, scored.probs[i], score,
                          true_label=names[y_true[i]], group=record.group, subtype=record.subtype))
    write_predictions_csv(out_dir / "predictions.csv", rows, names, inputs.bundle.operating_points)
    _list_skipped(skipped, write_skipped_csv(out_dir / "skipped.csv", skipped))


def _thresholds(bundle: ModelBundle, positive: str | None) -> dict[str, float]:
    """The model file's operating points, unless ``--positive`` names another class than theirs."""
    stored = bundle.operating_points
    if positive is not None and stored and positive.lower() != stored["positive_class"].lower():
        log.warning(f"not reporting the stored operating points: they take {stored['positive_class']} "
                    f"as positive, not {positive}")
        return {}
    return bundle.thresholds


def _metrics(inputs: _Inputs, y_true: np.ndarray, scored: Scored, *, patients: bool, positive: str | None,
             n_resamples: int, seed: int) -> dict[str, Any]:
    """``report.evaluate_predictions`` of the scored records (their subtypes too, where the data names
    them), and the calibration before and after a model file's temperature."""
    from breastvision.evaluation.report import calibration_entry, evaluate_predictions

    bundle, records = inputs.bundle, inputs.records
    subtypes = [r.subtype for r in records]
    metrics = evaluate_predictions(y_true, scored.probs, bundle.class_names, [r.group for r in records],
                                   grouping=inputs.catalog.grouping, patient_level=patients,
                                   positive_class=positive, thresholds=_thresholds(bundle, positive),
                                   subtypes=subtypes, n_resamples=n_resamples, seed=seed)
    if bundle.calibration:
        metrics["calibration"] = calibration_entry(metrics, y_true, scored.uncalibrated, bundle.calibration)
    return metrics


def _default_out(model: Path, source: str, subset: str | None, fold: int | None) -> Path:
    part = f"_{subset}" + (f"{fold}" if fold is not None else "") if subset else ""
    return Path("runs") / "evaluate" / f"{model.stem}_{source}{part}"


def evaluate_model(
    model: str | Path,
    source: str,
    *,
    data: str | None = None,
    split: str | Path | None = None,
    subset: str = "test",
    fold: int | None = None,
    out: str | Path | None = None,
    tta: bool | str | None = False,
    batch_size: int = 32,
    workers: int = 0,
    device: str = "auto",
    operating_point: str | None = None,
    positive: str | None = None,
    patient_level: str = "auto",
    patient_context: float = 0.0,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Evaluate a model file on a dataset name, image folder or manifest (or one ``subset`` of a
    ``split`` file) and write a report folder (module docstring); the arguments are the
    ``breastvision evaluate`` command's (``tta``: ``serving.predict.TtaChoice``; the report's
    ``tta`` names the view set averaged; ``patient_context``: ``evaluation.context``'s weight)."""
    from breastvision.evaluation.context import check_weight
    from breastvision.evaluation.report import write_report

    if batch_size < 1:
        raise BreastvisionError(f"--batch-size must be at least 1, got {batch_size}")
    check_weight(patient_context)
    model, split = Path(model), Path(split) if split else None
    inputs = _inputs(model, source, data, split, subset, fold, device, operating_point)
    bundle, catalog, records, views = inputs.bundle, inputs.catalog, inputs.records, inputs.views
    tta = inputs.predictor.resolve_tta(tta)
    mapping = class_mapping(catalog.class_names, bundle.class_names, {r.label for r in records})
    start = time.perf_counter()
    scored = _score(inputs, tta=tta, batch_size=batch_size, workers=workers, progress=progress)
    seconds = time.perf_counter() - start
    failures = scored.failures
    unreadable = [Skipped(records[i].path, reason) for i, reason in sorted(failures.items())]
    inputs.records, inputs.views = records, views = _without(records, failures), _without(views, failures)
    y_true = mapping[[r.label for r in records]]
    patients = _use_patients(patient_level, catalog.grouping)
    scored = _in_context(scored, records, patient_context, patients)
    metrics = _metrics(inputs, y_true, scored, patients=patients, positive=positive,
                       n_resamples=n_resamples, seed=seed)
    out_dir = Path(out) if out else _default_out(model, catalog.name, split and subset, fold)
    skipped = [*catalog.skipped, *unreadable]
    _write_listings(out_dir, inputs, y_true, scored, skipped)
    settings = {"source": source, "split": str(split) if split else None, "subset": subset if split else None,
                "fold": fold, "tta": tta, "device": str(resolve_device(device)), "batch_size": batch_size,
                "decision_rule": inputs.predictor.judge.rule,
                "patient_level": patients, "patient_context": patient_context,
                "bootstrap": {"n_resamples": n_resamples, "seed": seed}}
    config, facts, origin = _record(inputs, model, settings, seconds, len(unreadable))
    report = write_report(
        out_dir, metrics=metrics, config=config, split_info=split, weights_origin=origin,
        lineage=bundle.lineage, class_names=bundle.class_names, y_true=y_true, probs=scored.probs,
        facts=facts, title=f"{bundle.architecture} on {catalog.name}" + (f" ({subset})" if split else ""),
    )
    return Evaluation(metrics, out_dir, report, len(records), skipped)


def run(args: argparse.Namespace) -> int:
    """The ``breastvision evaluate`` command: :func:`evaluate_model` with its arguments."""
    from breastvision.evaluation.report import print_headline
    from breastvision.serving.cli import tta_choice
    from breastvision.training.progress import wanted

    resolve_device(args.device)  # an absent device is said before the data is read
    result = evaluate_model(
        args.model, args.source, data=args.data, split=args.split, subset=args.subset, fold=args.fold,
        out=args.out, tta=tta_choice(args), batch_size=args.batch_size, workers=args.workers,
        device=args.device, operating_point=args.operating_point, positive=args.positive,
        patient_level=args.patient_level, patient_context=args.patient_context,
        n_resamples=args.n_resamples, seed=args.seed, progress=wanted("auto"),
    )
    print_headline(result.metrics, result.report)
    return 0
