"""Ensembles on a cross-validation, honestly, and their latency under PyTorch and ONNX Runtime.

``cv``: given several cross-validation folders of one config that differ only in ``train.seed``
(same split, so fold k of each trained on the same images), builds fold k's ensemble of the runs'
fold-k models, evaluates it on fold k's test images (``evaluate_model``), pools the five folds'
out-of-fold predictions and prints the pooled metrics with their bootstrap intervals, beside each
single run's pooled ``crossval.json``::

    .venv/bin/python bench/bench_ensemble.py cv runs/busi_cv runs/busi_cv_s1 runs/busi_cv_s2 --out runs/ens_cv

``latency``: one image through an ensemble file by PyTorch and by its ONNX export, interleaved
round after round; the median of each in milliseconds::

    .venv/bin/python bench/bench_ensemble.py latency runs/ens_cv/fold0.safetensors --rounds 20
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from breastvision.evaluation.evaluate import evaluate_model
from breastvision.evaluation.report import evaluate_predictions
from breastvision.models.ensemble import ensemble_files
from breastvision.serving.export import export_onnx
from breastvision.serving.predict import load_predictor

HEADLINE = ("accuracy", "recall_macro", "auc")


def _headline(metrics: dict) -> dict:
    intervals = metrics["intervals"]
    return {m: {"value": round(metrics[m], 4),
                "ci95": [round(intervals[m]["ci_low"], 4), round(intervals[m]["ci_high"], 4)]}
            for m in HEADLINE}


def _read(path: Path, class_names: list[str]) -> tuple[list[str], list[int], np.ndarray]:
    rows = list(csv.DictReader(path.open()))
    labels = [class_names.index(r["true_label"]) for r in rows]
    probs = np.array([[float(r[f"p_{c}"]) for c in class_names] for r in rows])
    return [r["group"] for r in rows], labels, probs


def cross_validation(folders: list[Path], out: Path, folds: int) -> dict:
    groups, labels, probs, names = [], [], [], None
    for k in range(folds):
        splits = {(f / f"fold{k}" / "split.json").read_bytes() for f in folders}
        if len(splits) != 1:
            raise SystemExit(f"fold {k}: the runs were not trained on the same split")
        done = out / f"fold{k}" / "metrics.json"
        if not done.is_file():  # a fold evaluated by an interrupted run is reused
            model = ensemble_files([f / f"fold{k}" for f in folders], out / f"fold{k}.safetensors")
            evaluate_model(model, "busi", split=folders[0] / f"fold{k}" / "split.json", fold=k,
                           out=out / f"fold{k}", n_resamples=0)
        names = json.loads(done.read_text())["class_names"]
        g, y, p = _read(done.parent / "predictions.csv", names)
        groups += g
        labels += y
        probs.append(p)
    pooled = evaluate_predictions(np.array(labels), np.concatenate(probs), names, groups,
                                  grouping="near_duplicate", n_resamples=1000, seed=0)
    singles = {str(f): _headline(json.loads((f / "crossval.json").read_text())["pooled"]) for f in folders}
    return {"n_images": len(labels), "ensemble": _headline(pooled), "single_runs": singles}


def latency(model: Path, rounds: int) -> dict:
    onnx_path = export_onnx(model, model.with_suffix(".onnx")).path
    predictors = {"pytorch": load_predictor(model), "onnxruntime": load_predictor(onnx_path)}
    side = predictors["pytorch"].preprocessing.input_size
    batch = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds + 2):  # the first two rounds warm up and are dropped
        for name, predictor in predictors.items():
            start = time.perf_counter()
            predictor.probabilities(batch)
            times[name].append((time.perf_counter() - start) * 1000)
    return {"threads": torch.get_num_threads(), "rounds": rounds,
            **{f"{name}_ms_median": round(statistics.median(t[2:]), 1) for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cv = commands.add_parser("cv")
    cv.add_argument("folders", nargs="+", type=Path)
    cv.add_argument("--out", type=Path, required=True)
    cv.add_argument("--folds", type=int, default=5)
    lat = commands.add_parser("latency")
    lat.add_argument("model", type=Path)
    lat.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    result = (cross_validation(args.folders, args.out, args.folds) if args.command == "cv"
              else latency(args.model, args.rounds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
