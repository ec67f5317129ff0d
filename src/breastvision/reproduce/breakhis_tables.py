"""Paper 000's Tables 3-5 for ``reproduce breakhis``: the published numbers, and the markdown of
this toolkit's results beside them (``reproduce.breakhis`` runs the models and hands the results over).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

#: Table 3's columns, in the paper's order.
MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
#: Table rows: key (folder names, config roles) → the paper's name.
MODELS = {"densenet": "DenseNet", "densenet_se": "DenseNet+SE", "multilevel": "multi-level (proposed)"}
#: Paper 000 Table 3 (%), per magnification 40X, 100X, 200X, 400X.
PAPER_TABLE3 = {
    "densenet": {"P_arp": (73.9, 75.0, 77.6, 78.0), "P_img": (72.5, 77.5, 77.2, 77.5)},
    "densenet_se": {"P_arp": (78.0, 78.1, 78.5, 78.7), "P_img": (72.5, 75.6, 74.9, 80.3)},
    "multilevel": {"P_arp": (81.1, 83.7, 80.5, 81.6), "P_img": (79.9, 80.1, 79.0, 83.5)},
}
#: Paper 000 Table 4: parameters as printed ("7.138 k"; presumably millions) and model size (MB).
PAPER_TABLE4 = {
    "densenet": ("7.138 k", 82.5),
    "densenet_se": ("8.256 k", 89.6),
    "multilevel": ("7.879 k", 85.3),
}
#: Paper 000 Table 5: convergence time in minutes on an RTX 2080 Ti.
PAPER_TABLE5 = {"densenet": 1207, "densenet_se": 1325, "multilevel": 958}
PAPER_HARDWARE = "NVIDIA RTX 2080 Ti"


def _percent(cell: Any) -> Any:
    """A fraction or interval dict as percent, like the paper's table."""
    if isinstance(cell, Mapping):
        return {
            k: (v * 100 if isinstance(v, float) and k in ("value", "ci_low", "ci_high") else v)
            for k, v in cell.items()
        }
    return None if cell is None else cell * 100


#: Results: magnification → protocol ("cv", "random") → model key → :func:`_summary`.
Results = Mapping[str, Mapping[str, Mapping[str, Any]]]


def table3(results: Results, folds: int) -> tuple[list[dict], list[dict]]:
    """Table 3 rows (ours, the paper's): ``P_arp`` and ``P_img`` (%) per magnification, "—" where a
    magnification was not run."""
    from breastvision.evaluation.report import with_interval

    ours = []
    for protocol, label in protocol_labels(folds).items():
        for key, name in MODELS.items():
            by_mag = {
                mag: result
                for mag in MAGNIFICATIONS
                if (result := results.get(mag, {}).get(protocol, {}).get(key)) is not None
            }
            if not by_mag:
                continue
            row: dict[str, Any] = {"protocol": label, "model": name}
            for metric, path in (("P_arp", "patient.P_arp"), ("P_img", "accuracy")):
                for mag in MAGNIFICATIONS:
                    result = by_mag.get(mag)
                    row[f"{metric} {mag}"] = (
                        None if result is None else _percent(with_interval(result["metrics"], path))
                    )
            ours.append(row)
    paper = []
    for key, name in MODELS.items():
        row = {"protocol": "random 7:1:2 after 5x augmentation (LEAKY)", "model": name}
        for metric in ("P_arp", "P_img"):
            row.update(
                {f"{metric} {m}": v for m, v in zip(MAGNIFICATIONS, PAPER_TABLE3[key][metric], strict=True)}
            )
        paper.append(row)
    return ours, paper


def protocol_labels(folds: int) -> dict[str, str]:
    """Result keys → table labels, in table order (the leaky protocol first, as in the paper)."""
    return {"random": "random 7:1:2 image split (LEAKY)", "cv": f"patient-disjoint {folds}-fold CV"}


def details_rows(results: Results, folds: int) -> list[dict]:
    """Every headline metric of each magnification, model and protocol (fractions, 95% CIs)."""
    from breastvision.evaluation.report import with_interval

    rows = []
    for mag, by_protocol in results.items():
        for protocol, by_model in by_protocol.items():
            for key, result in by_model.items():
                m = result["metrics"]
                rows.append(
                    {
                        "magnification": mag,
                        "protocol": protocol_labels(folds)[protocol],
                        "model": MODELS[key],
                        "patients": (m.get("patient") or {}).get("n_patients"),
                        "images": m.get("n_images"),
                        "P_arp": with_interval(m, "patient.P_arp"),
                        "P_img": with_interval(m, "accuracy"),
                        "sensitivity": with_interval(m, "sensitivity"),
                        "specificity": with_interval(m, "specificity"),
                        "AUC": with_interval(m, "auc"),
                    }
                )
    return rows


def table4(results: Results) -> tuple[list[dict], list[dict]]:
    """Model sizes from the first magnification run: they do not depend on the data."""
    by_protocol = next(iter(results.values()), {})
    ours = []
    for key, name in MODELS.items():
        result = by_protocol.get("cv", {}).get(key) or by_protocol.get("random", {}).get(key)
        if result is None:
            continue
        params = result["parameters"]
        trainable = result["trainable_parameters"]
        ours.append(
            {
                "model": name,
                "parameters (M)": None if params is None else round(params / 1e6, 3),
                "trained here (M)": None if trainable is None else round(trainable / 1e6, 3),
                "model file (MB)": result["model_file_mb"],
            }
        )
    paper = [
        {"model": MODELS[k], "parameters (M)": p, "model file (MB)": mb}
        for k, (p, mb) in PAPER_TABLE4.items()
    ]
    return ours, paper


def _minutes(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds / 60, 2)


def table5(results: Results, hardware: str) -> tuple[list[dict], list[dict]]:
    """Times of the cross-validation runs, one row per magnification and model."""
    ours = []
    for mag, by_protocol in results.items():
        for key, name in MODELS.items():
            result = by_protocol.get("cv", {}).get(key)
            if result is None:
                continue
            ours.append(
                {
                    "magnification": mag,
                    "model": name,
                    "to best epoch, min (mean per fold)": _minutes(result["seconds_to_best_epoch_mean"]),
                    "LC25000 stage to best epoch, min": _minutes(result["extra_stage_seconds_to_best_epoch"]),
                    "whole CV wall-clock, min": _minutes(result["wall_clock_seconds_total"]),
                    "hardware": hardware,
                }
            )
    paper = [
        {"model": MODELS[k], "to best epoch, min (mean per fold)": v, "hardware": PAPER_HARDWARE}
        for k, v in PAPER_TABLE5.items()
    ]
    return ours, paper


def data_note(
    present: Mapping[str, Mapping[str, int]], run: Sequence[str], where: str, per_magnification: bool
) -> str:
    """What Table 3 was run on: the images of each magnification run, and why the others read "—"."""
    ran = "; ".join(
        f"{mag}, {present[mag]['images']} images of {present[mag]['slides']} slides "
        f"and {present[mag]['patients']} patients"
        for mag in run
    )
    how = (
        "each magnification trained and tested on its own images: data.options.magnification=<M>"
        if per_magnification
        else "the only magnification in the data"
    )
    left_out = [m for m in present if m not in run]
    absent = [m for m in MAGNIFICATIONS if m not in present]
    skipped = [
        f"{'/'.join(mags)} {why}"
        for mags, why in ((left_out, "left out by --magnifications"), (absent, "not in the data"))
        if mags
    ]
    not_run = f" Not run ('—'): {'; '.join(skipped)}." if skipped else ""
    return f"Data: BreakHis at {where}. Run: {ran} ({how}).{not_run}"


def hardware_line(threads: int | None) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU"
    cpu = platform.processor() or platform.machine()
    threads = threads or torch.get_num_threads()
    return f"CPU {cpu}, {os.cpu_count()} cores shared, {threads} torch thread(s) per run"


def _table3_notes(
    results: Results, *, preset: str, summary: str, folds: int, stain: str, data: str, skipped: Sequence[str]
) -> list[str]:
    """What Table 3's numbers rest on: data, protocols, stain normalisation, preset, what was not run."""
    cv_note = (
        f"Cross-validation: {folds} folds grouped by patient (slides of one person together), stratified; "
        "validation = the next fold; numbers pool the out-of-fold test predictions; intervals are 95% "
        "percentile bootstraps resampling patients."
    )
    leaky = (
        "LEAKY rows: h_random_712 splits images at random, so one patient's images sit in train and test "
        "(the paper split even after augmentation); they are optimistic and shown only beside the paper."
        if any("random" in by_protocol for by_protocol in results.values())
        else ""
    )
    notes = [
        data,
        cv_note,
        leaky,
        f"Stain normalisation: {stain}.",
        f"Preset `{preset}`: {summary}.",
    ]
    notes += [f"Not run: {s}." for s in skipped]
    return notes


def render(
    results: Results,
    *,
    preset: str,
    summary: str,
    folds: int,
    hardware: str,
    stain: str,
    data: str,
    skipped: Sequence[str] = (),
) -> str:
    """The markdown of Tables 3–5 (plus the per-model details), notes included; ``summary`` says
    what the ``preset`` trains, ``data`` is :func:`data_note`."""
    from breastvision.evaluation.report import comparison_table

    notes = _table3_notes(results, preset=preset, summary=summary, folds=folds, stain=stain, data=data,
                          skipped=skipped)
    t3, p3 = table3(results, folds)
    t4, p4 = table4(results)
    t5, p5 = table5(results, hardware)
    parts = [
        "# System H on BreakHis: paper 000 Tables 3-5",
        "",
        "## Table 3: patient-level (P_arp) and image-level (P_img) accuracy, %",
        "",
        comparison_table(t3, p3, " ".join(n for n in notes if n), digits=1),
        "## Details: every headline metric (fractions, 95% CI)",
        "",
        comparison_table(
            details_rows(results, folds), (), "Sensitivity and specificity take malignant as positive."
        ),
        "## Table 4: parameters and model size",
        "",
        comparison_table(
            t4,
            p4,
            "Model file: this toolkit's safetensors bundle (weights, normaliser, lineage); the paper's "
            "parameter counts are printed as '7.138 k' (presumably millions). Ours: the "
            f"{next(iter(results), '—')} runs (sizes do not depend on the magnification).",
            digits=3,
        ),
        "## Table 5: wall-clock time to convergence",
        "",
        comparison_table(
            t5,
            p5,
            "To best epoch: the training epochs' seconds until the best-on-validation epoch (feature "
            "caching excluded); whole CV: the sum of every fold's training session (caching, evaluation "
            "and, for the multi-level model, the LC25000 stage included). Runs shared the machine with "
            "other jobs, so times are upper bounds.",
            digits=2,
        ),
    ]
    return "\n".join(parts)
