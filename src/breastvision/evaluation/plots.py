"""PNG plots for a run's report: learning curves, confusion matrix, ROC and precision-recall curves,
reliability diagram, per-patient accuracy.

Matplotlib with the Agg backend through the object API (``Figure``), never ``pyplot``: no display
is needed, and no global figure state leaks between plots or threads.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from breastvision.errors import BreastvisionError

_DPI = 120

#: Learning-curve panels: title -> column-name suffixes that belong to it.
_CURVES = {"accuracy": ("acc", "accuracy"), "loss": ("loss",)}


def read_history(history: str | Path | Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per-epoch rows from a CSV file or a list of dicts; numeric cells only (blanks dropped)."""
    if isinstance(history, str | Path):
        path = Path(history)
        if not path.is_file():
            raise BreastvisionError(f"history file not found: {path}")
        with path.open(newline="") as handle:
            history = list(csv.DictReader(handle))
    rows = []
    for row in history:
        clean = {}
        for key, value in row.items():
            try:
                clean[str(key)] = float(value)
            except (TypeError, ValueError):
                continue  # blanks (a metric not logged that epoch) and text columns
        rows.append(clean)
    return rows


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    return path


def plot_learning_curves(
    history: str | Path | Sequence[Mapping[str, Any]], out_dir: str | Path, best_epoch: int | None = None
) -> dict[str, Path]:
    """``accuracy.png`` and ``loss.png``: every column ending in ``acc``/``accuracy`` or ``loss``
    (``train_loss``, ``val_loss``, ...) against ``epoch`` (or the row number), with a vertical
    line at ``best_epoch`` (the epoch whose weights were kept). Returns the files written, keyed
    by panel; a panel without columns is skipped."""
    rows = read_history(history)
    written: dict[str, Path] = {}
    for panel, suffixes in _CURVES.items():
        columns = sorted({k for r in rows for k in r if k != "epoch" and k.lower().endswith(suffixes)})
        if not columns:
            continue
        fig = Figure(figsize=(5.5, 3.8))
        ax = fig.add_subplot()
        for column in columns:
            points = [(r.get("epoch", i + 1), r[column]) for i, r in enumerate(rows) if column in r]
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=column)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel)
        ax.set_title(f"{panel} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
        written[panel] = _save(fig, Path(out_dir) / f"{panel}.png")
    return written


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """Counts beside the row-normalised matrix (each true class sums to 1: per-class recall on the
    diagonal), rows true, columns predicted."""
    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = 2.2 + 0.6 * len(class_names)
    fig = Figure(figsize=(2 * size + 1, size))
    for i, (values, title, fmt) in enumerate(
        ((counts, "counts", "d"), (normalised, "row-normalised (recall)", ".2f"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=max(values.max(), 1e-9))
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, format(v, fmt), ha="center", va="center",
                    color="white" if v > values.max() / 2 else "black")
        ticks = range(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=30, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    auc: Mapping[str, float | None] | None = None,
) -> Path:
    """One-vs-rest ROC curve per class (classes absent from ``y_true``, or making up all of it,
    have no curve and are named as such in the legend). ``auc`` maps class names to AUCs for
    the legend (``compute_metrics``'s per-class values)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for name, is_k, p_k in _one_vs_rest(ax, y_true, probs, class_names):
        fpr, tpr, _ = roc_curve(is_k, p_k)
        value = (auc or {}).get(name)
        ax.plot(fpr, tpr, label=name if value is None else f"{name} (AUC {value:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    _unit_axes(ax, "false positive rate", "true positive rate", "ROC, one vs rest")
    ax.legend(loc="lower right")
    return _save(fig, path)


def _one_vs_rest(
    ax: Any, y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, is_class, p_class)`` of each class that can have a one-vs-rest curve; a class
    absent from ``y_true`` (or making up all of it) gets a legend line saying it has none."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    for k, name in enumerate(class_names):
        is_k = y == k
        if not 0 < is_k.sum() < y.size:
            ax.plot([], [], " ", label=f"{name}: no curve (one class only)")
            continue
        yield name, is_k, p[:, k]


def _unit_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot_precision_recall(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | Path
) -> Path:
    """One-vs-rest precision-recall curve per class with its average precision, and the class's
    prevalence (what a random ranking scores) as a dotted line of the same colour."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for name, is_k, p_k in _one_vs_rest(ax, y_true, probs, class_names):
        precision, recall, _ = precision_recall_curve(is_k, p_k)
        ap = average_precision_score(is_k, p_k)
        (line,) = ax.plot(recall, precision, drawstyle="steps-post", label=f"{name} (AP {ap:.3f})")
        ax.axhline(is_k.mean(), color=line.get_color(), ls=":", lw=1)
    _unit_axes(ax, "recall", "precision", "precision-recall, one vs rest (dotted: prevalence)")
    ax.legend(loc="lower left")
    return _save(fig, path)


def plot_reliability(bins: Mapping[str, Any], path: str | Path) -> Path:
    """Reliability diagram of the top-label confidence: accuracy per confidence bin against the
    diagonal of perfect calibration, the image count per bin below; ``bins`` is
    :func:`calibration.reliability`'s dict (also ``compute_metrics``' ``reliability``)."""
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    filled = [i for i, n in enumerate(bins["count"]) if n]
    fig = Figure(figsize=(5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(edges[filled], [bins["accuracy"][i] for i in filled], width=width[filled], align="edge",
            edgecolor="black", color="tab:blue", label="accuracy")
    top.plot([bins["confidence"][i] for i in filled], [bins["accuracy"][i] for i in filled], "o",
             color="tab:red", markersize=3, label="(mean confidence, accuracy) per bin")
    top.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    top.set_ylim(0, 1.01)
    top.set_ylabel("accuracy in bin")
    top.set_title(f"reliability (ECE {bins['ece']:.3f})")
    top.legend(loc="upper left")
    bottom.bar(edges[:-1], bins["count"], width=width, align="edge", color="grey")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (highest probability)")
    bottom.set_ylabel("images")
    return _save(fig, path)


def plot_patient_accuracy(
    per_patient: Mapping[str, Mapping[str, Any]], path: str | Path, p_arp: float | None = None
) -> Path:
    """``P_rp`` of every patient as a bar (lowest first, image count on top), ``P_arp`` as a line."""
    items = sorted(per_patient.items(), key=lambda kv: (kv[1]["P_rp"], kv[0]))
    names = [k for k, _ in items]
    values = [v["P_rp"] for _, v in items]
    fig = Figure(figsize=(max(5.0, 0.28 * len(items) + 1.5), 3.8))
    ax = fig.add_subplot()
    bars = ax.bar(range(len(items)), values, color="tab:blue")
    ax.bar_label(bars, labels=[str(v["n_images"]) for _, v in items], fontsize=6)
    if p_arp is not None:
        ax.axhline(p_arp, color="tab:red", ls="--", label=f"P_arp = {p_arp:.3f}")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(items)), names, rotation=90, fontsize=6)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("P_rp (fraction of images correct)")
    ax.set_title("per-patient accuracy (bar labels: images)")
    return _save(fig, path)
