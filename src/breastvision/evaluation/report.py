"""One report folder per run, the predictions file, and comparison tables beside published numbers.

:func:`evaluate_predictions` is the one entry point training and ``breastvision evaluate`` call to
turn predictions into numbers; :func:`write_report` turns those numbers into a folder a reader can
check on its own::

    run_dir/
      report.md         the plots embedded by relative links, tables, provenance
      metrics.json      evaluate_predictions' dict, intervals included
      provenance.json   weights' origin, lineage, split file hash, run facts
      config.yaml       the configuration the run used
      split.json        the split file the run used (copied; its SHA-256 is in report.md)
      predictions.csv   per-image predictions, when written (serving.predict.write_predictions_csv)
      skipped.csv       files not evaluated and why, when written with write_skipped_csv
      plots/*.png
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from breastvision.data.records import PATIENT_GROUPINGS, Skipped
from breastvision.errors import BreastvisionError
from breastvision.evaluation import plots
from breastvision.evaluation.bootstrap import bootstrap, classification_statistic, resampling_unit
from breastvision.evaluation.metrics import compute_metrics
from breastvision.evaluation.operating_points import evaluate_operating_points
from breastvision.evaluation.subtypes import known_subtypes, subtype_metrics, subtype_statistic
from breastvision.paths import file_sha256, printable

#: The headline rows of a report's metrics table, as dotted paths into the metrics dict.
HEADLINE = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "auc",
    "sensitivity",
    "specificity",
    "ece",
    "brier",
    "patient.P_arp",
    "patient.P_img",
    "patient.diagnosis.accuracy",
    "patient.diagnosis.sensitivity",
    "patient.diagnosis.specificity",
)


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[Any] | np.ndarray | None = None,
    *,
    grouping: str | None = "patient",
    patient_level: bool | None = None,
    positive_class: str | None = None,
    thresholds: Mapping[str, float] | None = None,
    subtypes: Sequence[str | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """All metrics (:func:`metrics.compute_metrics`) plus bootstrap intervals of every scalar one.

    ``groups`` are the images' ``Record.group`` and ``grouping`` the catalog's ``grouping`` (what
    they are; ``None``: unknown, taken as single images). The bootstrap resamples whole groups
    (patients, near-duplicate groups) unless they are single images. ``patient_level`` (default:
    whether ``grouping`` is a patient grouping) adds the patient-level metrics. ``intervals`` maps
    dotted metric paths (``accuracy``, ``patient.P_arp``, ``per_class.benign.recall``) to
    ``{"value", "ci_low", "ci_high", ...}``; ``n_resamples=0`` leaves them out. ``thresholds``
    (name -> threshold, chosen on validation by :func:`operating_points.choose_operating_points`)
    add ``operating_points``: sensitivity and specificity of the malignant-vs-rest reading at each,
    with intervals from the same resampling. ``subtypes`` (``Record.subtype`` per image) add
    ``per_subtype`` (``evaluation.subtypes``) and its intervals.
    """
    if patient_level is None:
        patient_level = groups is not None and grouping in PATIENT_GROUPINGS
    if groups is None or (grouping in (None, "image") and not patient_level):
        groups, grouping = None, None  # single images: the plain image bootstrap
    patients = groups if patient_level else None
    unit = resampling_unit(grouping, patient_level)
    out = compute_metrics(y_true, probs, class_names, patients, positive_class=positive_class)
    subtypes = None if subtypes is None else known_subtypes(subtypes)
    if subtypes is not None:
        out["per_subtype"] = subtype_metrics(y_true, probs, class_names, subtypes, groups)
    if thresholds:
        out["operating_points"] = evaluate_operating_points(
            y_true, probs, class_names, thresholds, positive_class=positive_class, groups=groups,
            unit=unit, n_resamples=n_resamples, seed=seed, confidence=confidence,
        )
    if n_resamples > 0:
        statistic = classification_statistic(
            y_true, probs, class_names, patients, positive_class=positive_class
        )
        resampling = {"groups": groups, "unit": unit, "n_resamples": n_resamples, "seed": seed,
                      "confidence": confidence}
        out["intervals"] = bootstrap(statistic, out["n_images"], **resampling)
        if subtypes is not None:
            # The same seed draws the same resamples, so these intervals match the others'.
            by_subtype = subtype_statistic(y_true, probs, class_names, subtypes, groups)
            out["intervals"].update(bootstrap(by_subtype, out["n_images"], **resampling))
        out["bootstrap"] = {
            "method": "percentile",
            "n_resamples": n_resamples,
            "seed": seed,
            "confidence": confidence,
            "resampled": unit,
        }
        if groups is not None:
            out["bootstrap"]["n_groups"] = len(set(np.asarray(groups).astype(str).tolist()))
    return out


def lookup(metrics: Mapping[str, Any], dotted: str) -> Any:
    """``metrics["patient"]["P_arp"]`` for ``"patient.P_arp"``; ``None`` when absent."""
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def lookup_number(metrics: Mapping[str, Any], dotted: str, what: str) -> float:
    """:func:`lookup` of a metric something is chosen on (``what`` names the choice in the error):
    a number, or a one-line error."""
    value = lookup(metrics, dotted)
    if not isinstance(value, int | float):
        raise BreastvisionError(f"{what} metric '{dotted}' is not a number in the metrics")
    return float(value)


def with_interval(metrics: Mapping[str, Any], dotted: str) -> Any:
    """What a table shows for a metric: its bootstrap interval (``evaluate_predictions``'
    ``intervals``) when there is one, else the bare value; ``None`` when absent."""
    return (metrics.get("intervals") or {}).get(dotted) or lookup(metrics, dotted)


def print_headline(metrics: Mapping[str, Any], report: Path) -> None:
    """The headline metrics (with intervals where there are any) and where the report is."""
    for key in HEADLINE:
        value = with_interval(metrics, key)
        if value is not None:
            print(f"{key:>29}: {format_value(value)}")
    if metrics.get("absent_classes"):
        print(absent_classes_line(metrics))
    print(f"report: {report}")


def absent_classes_line(metrics: Mapping[str, Any]) -> str:
    """The one line that says which of the model's classes the data lacks (macro averages skip them)."""
    absent = ", ".join(metrics["absent_classes"])
    return f"classes absent from the true labels: {absent} (macro averages are {metrics['macro_average']})"


def print_run_headline(run_dir: Path) -> None:
    """:func:`print_headline` of a finished run folder (training, cross-validation, a chain's last
    stage), so every command that trains ends by showing what it measured."""
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    print_headline(metrics, Path(run_dir) / "report.md")


def format_value(value: Any, digits: int | None = 3) -> str:
    """A table cell: ``0.812 (0.771–0.850)`` for an interval, ``—`` for a missing value.

    ``digits`` fixes the decimals of floats (metrics); ``None`` prints up to 6 significant
    digits without padding (run facts such as 42.69 MB).
    """
    if value is None:
        return "—"
    if isinstance(value, Mapping) and "value" in value:
        text = format_value(value["value"], digits)
        if value.get("ci_low") is not None and value.get("ci_high") is not None:
            text += f" ({format_value(value['ci_low'], digits)}–{format_value(value['ci_high'], digits)})"
        return text
    if isinstance(value, bool | str):
        return str(value).replace("|", "\\|")
    if isinstance(value, int | np.integer):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float | np.floating):
        # Counts and sizes stored as floats (7e6 parameters) read better without decimals.
        if value.is_integer() and abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.6g}" if digits is None else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def readable(value: Any) -> Any:
    """A nested lineage or provenance value as one line of text for a table cell: ``key: value``
    pairs joined by ``; ``, lists by ``, ``, missing parts left out; scalars pass through."""
    if isinstance(value, Mapping):
        shown = [f"{k}: {readable(v)}" for k, v in value.items() if v not in (None, "", [], {})]
        return "; ".join(shown) or None
    if isinstance(value, list | tuple):
        return ", ".join(str(readable(v)) for v in value) or None
    return value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int | None = 3) -> str:
    lines = ["| " + " | ".join(format_value(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_value(c, digits) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(
    rows: Sequence[Mapping[str, Any]],
    paper_rows: Sequence[Mapping[str, Any]] = (),
    note: str = "",
    *,
    digits: int = 3,
) -> str:
    """Our runs beside published numbers, as one markdown table.

    Each row maps column names to cells: text, a number, an interval dict (printed with its CI)
    or ``None`` (not run: "—"). Columns appear in first-seen order; a ``source`` column says which
    rows are this toolkit's runs and which are the paper's. ``note`` (setting, data, what was not
    run and why) is printed under the table, where it cannot be separated from the numbers.
    """
    tagged = [{"source": "this run", **r} for r in rows] + [{"source": "paper", **r} for r in paper_rows]
    if not tagged:
        raise BreastvisionError("comparison_table needs at least one row")
    columns = list(dict.fromkeys(k for r in tagged for k in r))
    table = markdown_table(columns, [[r.get(c) for c in columns] for r in tagged], digits)
    return table + (f"\n\n{note.strip()}\n" if note.strip() else "\n")


def write_skipped_csv(path: str | Path, skipped: Sequence[Skipped]) -> Path:
    """One row per file that was not evaluated: path and reason."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows([printable(s.path), printable(s.reason)] for s in skipped)
    return path


def _jsonable(value: Any) -> Any:
    """Paths, tuples, numpy scalars and arrays as plain JSON types (for YAML and JSON dumps)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _copy_split(run_dir: Path, split_info: str | Path | Mapping[str, Any] | None) -> dict[str, Any]:
    """Put the split file into the report; return what report.md says about it."""
    if split_info is None:
        return {}
    target = run_dir / "split.json"
    if isinstance(split_info, Mapping):
        target.write_text(json.dumps(_jsonable(split_info), indent=1))
        content = dict(split_info)
        origin = "given in memory"
    else:
        source = Path(split_info)
        if not source.is_file():
            raise BreastvisionError(f"split file not found: {source}")
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        try:
            content = json.loads(target.read_text())
        except json.JSONDecodeError as err:
            raise BreastvisionError(f"split file {source} is not JSON: {err}") from err
        origin = str(source)
    summary = {"file": target.name, "origin": origin, "sha256": file_sha256(target)}
    # Only the descriptive top-level fields; the per-file assignment stays in the copied file.
    summary.update({k: v for k, v in content.items() if not isinstance(v, Mapping | list)})
    return summary


def _write_config(run_dir: Path, config: str | Path | Mapping[str, Any] | None) -> str | None:
    if config is None:
        return None
    target = run_dir / "config.yaml"
    if isinstance(config, Mapping):
        target.write_text(yaml.safe_dump(_jsonable(config), sort_keys=False))
    else:
        source = Path(config)
        if not source.is_file():
            raise BreastvisionError(f"config file not found: {source}")
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    return target.name


def write_report(
    run_dir: str | Path,
    *,
    metrics: Mapping[str, Any],
    config: str | Path | Mapping[str, Any] | None = None,
    split_info: str | Path | Mapping[str, Any] | None = None,
    weights_origin: Mapping[str, Any] | str | None = None,
    lineage: Sequence[Mapping[str, Any]] = (),
    history: str | Path | Sequence[Mapping[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
    y_true: Sequence[int] | np.ndarray | None = None,
    probs: np.ndarray | None = None,
    facts: Mapping[str, Any] | None = None,
    title: str = "breastvision run",
    best_epoch: int | None = None,
    extra_sections: Sequence[str] = (),
) -> Path:
    """Write the report folder (layout in the module docstring) and return ``report.md``'s path.

    ``metrics`` is :func:`evaluate_predictions`' dict. ``y_true`` / ``probs`` add the ROC and
    precision-recall plots; ``history`` (per-epoch CSV or rows) adds the learning curves, marked
    at ``best_epoch`` (default: ``facts["best_epoch"]``, which training records); ``facts`` are
    extra run facts shown as a table (parameter count, model size, wall-clock time, device, ...);
    ``extra_sections`` are further markdown sections appended at the end (cross-validation's
    per-fold table).
    """
    run_dir = Path(run_dir)
    plot_dir = run_dir / "plots"
    names = list(class_names or metrics["class_names"])
    (run_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1))
    config_name = _write_config(run_dir, config)
    split = _copy_split(run_dir, split_info)
    provenance = {
        "weights_origin": weights_origin if weights_origin is not None else "not recorded",
        "lineage": list(lineage),
        "split": split or None,
        "facts": dict(facts or {}),
    }
    (run_dir / "provenance.json").write_text(json.dumps(_jsonable(provenance), indent=1))

    best = best_epoch if best_epoch is not None else (facts or {}).get("best_epoch")
    figures = _figures(plot_dir, metrics, names, history, y_true, probs, best)
    sections = [f"# {title}", _data_section(metrics, split), _metrics_section(metrics, names)]
    sections.append(_provenance_section(provenance, config_name))
    sections.append("## Plots\n\n" + "\n\n".join(
        f"### {caption}\n\n![{caption}]({p.relative_to(run_dir).as_posix()})" for caption, p in figures
    ))
    if (run_dir / "predictions.csv").is_file():
        sections.append("Per-image predictions: [predictions.csv](predictions.csv).")
    if (run_dir / "skipped.csv").is_file():
        sections.append("Files not evaluated, with the reason: [skipped.csv](skipped.csv).")
    sections += list(extra_sections)
    report = run_dir / "report.md"
    report.write_text("\n\n".join(s for s in sections if s) + "\n")
    return report


def _figures(
    plot_dir: Path,
    metrics: Mapping[str, Any],
    names: list[str],
    history: str | Path | Sequence[Mapping[str, Any]] | None,
    y_true: Sequence[int] | np.ndarray | None,
    probs: np.ndarray | None,
    best: int | None,
) -> list[tuple[str, Path]]:
    """The report's plots, drawn into ``plot_dir``: (caption, file) each; learning curves marked at
    epoch ``best``."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []
    if history is not None:
        curves = plots.plot_learning_curves(history, plot_dir, best)
        figures += [(f"{k} per epoch" + (f" (dotted: best epoch {best})" if best else ""), p)
                    for k, p in curves.items()]
    if "confusion_matrix" in metrics:
        figures.append(("confusion matrix", plots.plot_confusion_matrix(
            metrics["confusion_matrix"], names, plot_dir / "confusion_matrix.png")))
    if y_true is not None and probs is not None:
        auc = {c: v.get("auc") for c, v in metrics.get("per_class", {}).items()}
        figures.append(("ROC curves", plots.plot_roc(y_true, probs, names, plot_dir / "roc.png", auc)))
        figures.append(("precision-recall curves", plots.plot_precision_recall(
            y_true, probs, names, plot_dir / "precision_recall.png")))
    if metrics.get("reliability"):
        figures.append(("reliability diagram", plots.plot_reliability(
            metrics["reliability"], plot_dir / "reliability.png")))
    patient = metrics.get("patient")
    if patient:
        figures.append(("per-patient accuracy", plots.plot_patient_accuracy(
            patient["per_patient"], plot_dir / "patient_accuracy.png", patient["P_arp"])))
    return figures


def _data_section(metrics: Mapping[str, Any], split: Mapping[str, Any]) -> str:
    lines = ["## Data", "", f"- images evaluated: {metrics.get('n_images')}",
             f"- classes: {', '.join(metrics.get('class_names', []))}"]
    if metrics.get("patient"):
        lines.append(f"- patients: {metrics['patient']['n_patients']}")
    if split:
        details = ", ".join(f"{k}: {v}" for k, v in split.items() if k not in ("file", "sha256"))
        lines.append(
            f"- split file: [{split['file']}]({split['file']}) (SHA-256 `{split['sha256']}`; {details})"
        )
        if split.get("leaky"):
            lines.append("- **this split is leaky** (images of one patient or near-duplicates on both "
                         "sides): its numbers overstate how the model does on new patients")
    else:
        lines.append("- split file: none (evaluated on a whole dataset or external folder)")
    boot = metrics.get("bootstrap")
    if boot:
        drawn = boot["resampled"]
        if "n_groups" in boot:
            drawn = f"the {boot['n_groups']} {drawn}, each drawn with all of its images"
        lines.append(f"- intervals: {boot['confidence']:.0%} percentile bootstrap, {boot['n_resamples']} "
                     f"resamples of {drawn}, seed {boot['seed']}")
    return "\n".join(lines)


def _metrics_section(metrics: Mapping[str, Any], names: Sequence[str]) -> str:
    intervals = metrics.get("intervals", {})
    rows = [[key, with_interval(metrics, key)] for key in HEADLINE
            if lookup(metrics, key) is not None or key in intervals]
    boot = metrics.get("bootstrap")
    column = f"value ({boot['confidence']:.0%} CI)" if boot else "value"
    parts = ["## Metrics", "", markdown_table(["metric", column], rows)]
    if metrics.get("absent_classes"):
        parts += ["", absent_classes_line(metrics) + "."]
    if metrics.get("auc_average"):
        note = f" {metrics['auc_note']}." if metrics.get("auc_note") else ""
        parts += ["", f"AUC: {metrics['auc_average']}.{note}"]
    if metrics.get("positive_class"):
        parts.append(f"Sensitivity and specificity take **{metrics['positive_class']}** as positive.")
    if metrics.get("reliability"):
        n_bins = len(metrics["reliability"]["count"])
        parts.append(f"Calibration: ECE is the top-label expected calibration error over {n_bins} "
                     "equal-width confidence bins (0 is perfect); Brier is the mean squared error of the "
                     "probabilities against the one-hot truth (one class's probability for two classes).")
    if metrics.get("calibration"):
        parts.append(_calibration_line(metrics))
    if metrics.get("segmentation"):
        parts.append(_segmentation_line(metrics["segmentation"]))
    per_class = metrics.get("per_class", {})
    if per_class:
        header = ["class", "support", "precision", "recall", "f1", "auc"]
        table = [
            [c, per_class[c]["support"], *(with_interval(metrics, f"per_class.{c}.{m}") for m in header[2:])]
            for c in names if c in per_class
        ]
        parts += ["", "### Per class", "", markdown_table(header, table)]
    if metrics.get("per_subtype"):
        parts += ["", _subtype_section(metrics)]
    if metrics.get("operating_points"):
        parts += ["", _operating_points_section(metrics["operating_points"], column)]
    if "confusion_matrix" in metrics:
        matrix = [[f"true {c}", *row] for c, row in zip(names, metrics["confusion_matrix"], strict=True)]
        parts += ["", "### Confusion matrix (rows true, columns predicted)", "",
                  markdown_table(["", *(f"pred {c}" for c in names)], matrix)]
    return "\n".join(parts)


def _subtype_section(metrics: Mapping[str, Any]) -> str:
    """The per-subtype recall table (``evaluation.subtypes``), grouped by class."""
    entries = sorted(metrics["per_subtype"].items(), key=lambda item: (item[1]["class"], item[0]))
    rows = [[name, e["class"], e["n_images"], e["n_groups"], f"{e['correct']}/{e['n_images']}",
             with_interval(metrics, f"per_subtype.{name}.recall")] for name, e in entries]
    header = ["subtype", "class", "images", "groups", "given their class", "recall"]
    return ("### Per subtype\n\nThe share of each subtype's images given their true class: for a "
            "benign subtype its specificity, for a malignant one its sensitivity. A subtype seen in one "
            "group has no interval: a resample holds that group whole or not at all.\n\n"
            + markdown_table(header, rows))


def calibration_entry(metrics: Mapping[str, Any], y_true: Sequence[int] | np.ndarray,
                      uncalibrated: np.ndarray, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics["calibration"]`` for probabilities scored with a fitted temperature: ``T``, what it
    was fitted on, and ECE and Brier before (``uncalibrated``: the same model at ``T = 1``) and after
    (the scored probabilities' own ``ece`` and ``brier``)."""
    from breastvision.evaluation.calibration import brier_score, expected_calibration_error

    return {"temperature": float(calibration["temperature"]),
            "fitted_on": calibration.get("fitted_on", "validation"),
            "ece_uncalibrated": expected_calibration_error(y_true, uncalibrated),
            "ece_calibrated": metrics.get("ece"),
            "brier_uncalibrated": brier_score(y_true, uncalibrated),
            "brier_calibrated": metrics.get("brier")}


def _calibration_line(metrics: Mapping[str, Any]) -> str:
    calibration = metrics["calibration"]
    line = (f"Probabilities are temperature-scaled, softmax(logits / T) with T = "
            f"{calibration['temperature']:.3f} fitted on {calibration.get('fitted_on', 'validation')}")
    before = calibration.get("ece_uncalibrated")
    if before is None or metrics.get("ece") is None:
        return line + "."
    line += f": ECE {before:.3f} uncalibrated → {metrics['ece']:.3f} calibrated"
    brier = calibration.get("brier_uncalibrated")
    if brier is not None and metrics.get("brier") is not None:
        line += f", Brier {brier:.3f} → {metrics['brier']:.3f}"
    return line + "."


def _segmentation_line(dice: Mapping[str, Any]) -> str:
    return (f"Auxiliary lesion-mask head (trained beside the classifier, unused by prediction): Dice "
            f"{format_value(dice['dice'])} over {dice['images']} test views, "
            f"{format_value(dice['dice_lesion'])} over the {dice['lesion_images']} with a lesion (an image "
            "without a lesion scores 1 when its predicted mask is empty, else 0).")


def _operating_points_section(operating: Mapping[str, Any], column: str) -> str:
    name = operating["positive_class"]
    # Thresholds near 0 or 1 need more than the metrics' three decimals.
    rows = [[point, f"{p['threshold']:.4g}", p["sensitivity"], p["specificity"]]
            for point, p in operating["points"].items()]
    return "\n".join([
        f"### Operating points ({name} vs the rest)", "",
        f"An image is called {name} when P({name}) ≥ the threshold; thresholds were chosen on validation "
        "data and applied unchanged here.", "",
        markdown_table(["operating point", "threshold", *(column.replace("value", m) for m in
                                                          ("sensitivity", "specificity"))], rows),
    ])


def _provenance_section(provenance: Mapping[str, Any], config_name: str | None) -> str:
    parts = ["## Provenance", ""]
    origin = provenance["weights_origin"]
    if isinstance(origin, Mapping):
        parts += ["Weights' origin:", "", markdown_table(["part", "started from"],
                                                         [[k, readable(v)] for k, v in origin.items()])]
    else:
        parts.append(f"Weights' origin: {origin}")
    lineage = provenance["lineage"]
    if lineage:
        columns = list(dict.fromkeys(k for step in lineage for k in step))
        parts += ["", "Lineage (oldest first):", "",
                  markdown_table(["#", *columns], [[i, *(readable(s.get(c)) for c in columns)]
                                                   for i, s in enumerate(lineage, 1)])]
    if provenance["facts"]:
        facts = [[k, readable(v)] for k, v in provenance["facts"].items()]
        parts += ["", "Run facts:", "", markdown_table(["fact", "value"], facts, digits=None)]
    if config_name:
        parts += ["", f"Configuration: [{config_name}]({config_name})."]
    return "\n".join(parts)
