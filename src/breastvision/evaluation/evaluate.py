"""``breastvision evaluate MODEL SOURCE``: a saved model file on any dataset, folder or manifest.

The command's arguments are declared in ``evaluation.cli``, which imports this module only when
the command runs (torch and numpy are slow to import; ``breastvision --help`` should not wait).

The model file says how to pre-process (``ModelBundle.preprocessing``, fitted stain normaliser
included), so the same command scores the test split of a training run, held-out patients or
another hospital's images. Labels are matched to the model's classes *by name*, never by index:
an external folder listing its classes in another order still scores correctly, and a class the
model never learnt is refused. A dataset holding only some of the model's classes is fine (AUC
of the missing ones is undefined and says so; patient-level metrics still apply).

Patient-level metrics are used when the dataset's groups are patients or slides (BreakHis: one
slide per patient; a manifest's ``patient`` / ``patient_id`` column); other groupings, such as
BUSI's near-duplicate groups, are not patients, so those runs report image-level metrics only
unless ``--patient-level on`` says the groups are patients. The bootstrap resamples whole groups
whatever they are (patients, near-duplicate groups); only image grouping resamples images.

Files the readers skip, and images that pass their header check but cannot be decoded (truncated
pixel data) or prepared, are listed in the report folder's ``skipped.csv`` and named in the log;
the rest of the run completes.

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
import torch

from breastvision.data.records import PATIENT_GROUPINGS, Catalog, Record, Skipped
from breastvision.data.splits import Split
from breastvision.devices import resolve_device
from breastvision.errors import BreastvisionError

if TYPE_CHECKING:
    from breastvision.models.bundle import ModelBundle

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


class _ImageDataset(torch.utils.data.Dataset):
    """(file, view) items → ``(index, tensor)`` by the model file's own pre-processing, or ``(index,
    reason)`` for a file that cannot be decoded (truncated pixel data passes the readers' header check)
    or prepared: one bad file is a listed skip, not the end of the run.

    A view (a dihedral name, for splits drawn after offline augmentation) is applied to the image
    before pre-processing, as the offline augmentation was.
    """

    def __init__(self, items: Sequence[tuple[Path, str | None]], preprocessing: Any) -> None:
        self.items = list(items)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        from breastvision.data.io import load_image
        from breastvision.data.transforms import apply_view, preprocess_image

        path, view = self.items[index]
        try:
            image = load_image(path)
            image = image if view is None else apply_view(image, view)
            return index, preprocess_image(image, self.preprocessing)
        except BreastvisionError as err:
            # BadImageError names the file; other errors (a stain normaliser failing) may not.
            return index, str(err).removeprefix(f"{path}: ")


def _collate(samples: list[tuple[int, torch.Tensor | str]]) -> tuple[torch.Tensor | None, dict[int, str]]:
    """A batch of the samples that were prepared, and the reasons of those that were not, by index."""
    tensors = [item for _, item in samples if isinstance(item, torch.Tensor)]
    failed = {index: item for index, item in samples if isinstance(item, str)}
    return (torch.stack(tensors) if tensors else None), failed


@torch.inference_mode()
def predict_probs(
    model: torch.nn.Module,
    items: Sequence[Path | tuple[Path, str | None]],
    preprocessing: Any,
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
    tta: bool = False,
    progress: bool = False,
    temperature: float = 1.0,
) -> tuple[np.ndarray, dict[int, str]]:
    """Softmax probabilities ``(N, C)`` for the image files (or ``(file, view)`` pairs) that could be
    prepared, in order, and the reason for each that could not, by its index in ``items``; with
    ``tta`` the mean over the 8 dihedral views (``data.transforms.dihedral_tta``). ``progress``
    draws a bar (else slow runs log their pace). ``temperature``: the model file's calibration, as
    ``serving.predict.Predictor.probabilities`` applies it (``softmax(logits / T)``)."""
    from breastvision.data.transforms import dihedral_tta
    from breastvision.training.progress import progress_bar

    pairs = [item if isinstance(item, tuple) else (item, None) for item in items]
    loader = torch.utils.data.DataLoader(
        _ImageDataset(pairs, preprocessing), batch_size=batch_size, num_workers=workers,
        pin_memory=device.type == "cuda", collate_fn=_collate,
    )
    model = model.to(device).eval()

    def scaled(x: torch.Tensor) -> torch.Tensor:
        return model(x) / temperature

    out, failures = [], {}
    with progress_bar(None, len(loader), "evaluating", progress) as bar:
        for batch, failed in loader:
            bar.advance()
            failures.update(failed)
            if batch is None:
                continue
            batch = batch.to(device, non_blocking=True)
            probs = dihedral_tta(scaled, batch) if tta else scaled(batch).softmax(dim=1)
            out.append(probs.float().cpu().numpy())
    if not out:
        first = min(failures, default=None)
        detail = f": none of the {len(pairs)} could be read, e.g. {pairs[first][0]}: {failures[first]}"
        raise BreastvisionError("no images to predict" + (detail if first is not None else ""))
    return np.concatenate(out), failures


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
    bundle: Any
    network: torch.nn.Module
    catalog: Catalog
    records: list[Record]
    views: list[str | None]


def _inputs(model: Path, source: str, data: str | None, split_file: Path | None, subset: str,
            fold: int | None) -> _Inputs:
    from breastvision.data.readers import read_dataset
    from breastvision.models.bundle import ModelBundle

    if fold is not None and split_file is None:
        raise BreastvisionError("--fold needs --split")
    bundle = ModelBundle.load(model)
    network = bundle.build_model()  # a model file whose weights do not fit fails before any data is read
    split = Split.load(split_file) if split_file else None
    # A split is checked against the file list it was made for: read with the same options.
    options = split.params.get("read_options", {}) if split else {}
    catalog = read_dataset(source, root=data, **options)
    records, views = select_items(catalog, split, subset, fold)
    if not records:
        part = f" (part {subset!r} of {split_file})" if split_file else ""
        raise BreastvisionError(f"no images to evaluate in {source}{part}")
    return _Inputs(bundle, network, catalog, records, views)


def _record(inputs: _Inputs, model_path: Path, settings: dict[str, Any], model: torch.nn.Module,
            seconds: float, unreadable: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """What the report says about the evaluation: its configuration, facts and weights' origin."""
    from breastvision.paths import file_sha256

    bundle, catalog, n = inputs.bundle, inputs.catalog, len(inputs.records)
    model_sha = file_sha256(model_path)
    config = {"command": "evaluate", "model": str(model_path), "model_sha256": model_sha,
              "source": settings["source"], "data_root": str(catalog.root),
              "read_options": catalog.meta.get("read_options", {}), **settings,
              "model_file": {k: v for k, v in bundle.metadata().items() if k != "metrics"}}
    patients = settings["patient_level"]
    facts = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "model file size (MB)": round(model_path.stat().st_size / 2**20, 2),
        "inference time (s)": round(seconds, 2),
        "images / s": round(n / seconds, 1) if seconds > 0 else None,
        "device": settings["device"],
        "test-time augmentation": "8 dihedral views" if settings["tta"] else "none",
        "files skipped by the reader": len(catalog.skipped),
        "images that could not be decoded": unreadable,
        "patient-level metrics": f"yes (groups: {catalog.grouping})" if patients
        else f"no (groups: {catalog.grouping}, not patients)",
    }
    origin = {"model file": f"{model_path} (sha256 {model_sha[:16]}…)",
              **bundle.extra.get("weights_origin", {})}
    return config, facts, origin


def _write_listings(out_dir: Path, inputs: _Inputs, y_true: np.ndarray, probs: np.ndarray,
                    groups: list[str], skipped: list[Skipped]) -> None:
    """predictions.csv (names relative to the dataset root, ``::view`` when there is one) and
    skipped.csv, each file named in the log up to :data:`SKIPPED_SHOWN`."""
    from breastvision.evaluation.report import write_predictions_csv, write_skipped_csv

    catalog = inputs.catalog
    shown = [catalog.relpath(r) if r.path.is_relative_to(catalog.root) else str(r.path)
             for r in inputs.records]
    shown = [p if v is None else f"{p}::{v}" for p, v in zip(shown, inputs.views, strict=True)]
    names = inputs.bundle.class_names
    write_predictions_csv(out_dir / "predictions.csv", shown, y_true, probs, names, groups)
    _list_skipped(skipped, write_skipped_csv(out_dir / "skipped.csv", skipped))


def _thresholds(bundle: ModelBundle, positive: str | None) -> dict[str, float]:
    """The model file's operating points, unless ``--positive`` names another class than theirs."""
    stored = bundle.operating_points
    if positive is not None and stored and positive.lower() != stored["positive_class"].lower():
        log.warning(f"not reporting the stored operating points: they take {stored['positive_class']} "
                    f"as positive, not {positive}")
        return {}
    return bundle.thresholds


def evaluate_model(
    model: str | Path,
    source: str,
    *,
    data: str | None = None,
    split: str | Path | None = None,
    subset: str = "test",
    fold: int | None = None,
    out: str | Path | None = None,
    tta: bool = False,
    batch_size: int = 32,
    workers: int = 0,
    device: str = "auto",
    positive: str | None = None,
    patient_level: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> Evaluation:
    """Evaluate a model file on a dataset name, image folder or manifest (or one ``subset`` of a
    ``split`` file) and write a report folder (module docstring); the arguments are the
    ``breastvision evaluate`` command's."""
    from breastvision.evaluation.report import evaluate_predictions, write_report

    if batch_size < 1:
        raise BreastvisionError(f"--batch-size must be at least 1, got {batch_size}")
    model, split = Path(model), Path(split) if split else None
    inputs = _inputs(model, source, data, split, subset, fold)
    bundle, catalog, records, views = inputs.bundle, inputs.catalog, inputs.records, inputs.views
    mapping = class_mapping(catalog.class_names, bundle.class_names, {r.label for r in records})
    torch_device = resolve_device(device)
    network = inputs.network
    start = time.perf_counter()
    probs, failures = predict_probs(network, list(zip([r.path for r in records], views, strict=True)),
                                    bundle.preprocessing, device=torch_device, batch_size=batch_size,
                                    workers=workers, tta=tta, progress=progress,
                                    temperature=bundle.temperature)
    seconds = time.perf_counter() - start
    unreadable = [Skipped(records[i].path, reason) for i, reason in sorted(failures.items())]
    inputs.records, inputs.views = records, views = _without(records, failures), _without(views, failures)
    y_true = mapping[[r.label for r in records]]
    patients = _use_patients(patient_level, catalog.grouping)
    groups = [r.group for r in records]
    metrics = evaluate_predictions(y_true, probs, bundle.class_names, groups, grouping=catalog.grouping,
                                   patient_level=patients, positive_class=positive,
                                   thresholds=_thresholds(bundle, positive), n_resamples=n_resamples,
                                   seed=seed)
    if bundle.calibration:
        metrics["calibration"] = {"temperature": bundle.temperature}

    part = f"_{subset}" + (f"{fold}" if fold is not None else "") if split else ""
    out_dir = Path(out) if out else Path("runs") / "evaluate" / f"{model.stem}_{catalog.name}{part}"
    skipped = [*catalog.skipped, *unreadable]
    _write_listings(out_dir, inputs, y_true, probs, groups, skipped)
    settings = {"source": source, "split": str(split) if split else None, "subset": subset if split else None,
                "fold": fold, "tta": tta, "device": str(torch_device), "batch_size": batch_size,
                "patient_level": patients, "bootstrap": {"n_resamples": n_resamples, "seed": seed}}
    config, facts, origin = _record(inputs, model, settings, network, seconds, len(unreadable))
    report = write_report(
        out_dir, metrics=metrics, config=config, split_info=split, weights_origin=origin,
        lineage=bundle.lineage, class_names=bundle.class_names, y_true=y_true, probs=probs, facts=facts,
        title=f"{bundle.architecture} on {catalog.name}" + (f" ({subset})" if split else ""),
    )
    return Evaluation(metrics, out_dir, report, len(records), skipped)


def run(args: argparse.Namespace) -> int:
    """The ``breastvision evaluate`` command: :func:`evaluate_model` with its arguments."""
    from breastvision.evaluation.report import print_headline
    from breastvision.training.progress import wanted

    resolve_device(args.device)  # an absent device is said before the data is read
    result = evaluate_model(
        args.model, args.source, data=args.data, split=args.split, subset=args.subset, fold=args.fold,
        out=args.out, tta=args.tta, batch_size=args.batch_size, workers=args.workers, device=args.device,
        positive=args.positive, patient_level=args.patient_level, n_resamples=args.n_resamples,
        seed=args.seed, progress=wanted("auto"),
    )
    print_headline(result.metrics, result.report)
    return 0
