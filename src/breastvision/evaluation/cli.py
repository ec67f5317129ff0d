"""``breastvision evaluate``: its arguments only; the work is in ``evaluation.evaluate``, imported
when the command runs so that ``breastvision --help`` does not import torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from breastvision.devices import add_device_option
from breastvision.serving.cli import add_operating_point_option, add_tta_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a saved model file on a dataset, folder or manifest",
        description="Evaluate a saved model file on a dataset, image folder or manifest (or one part of a "
        "split): metrics with bootstrap intervals, plots, predictions and a report folder.",
    )
    parser.add_argument("model", type=Path, help="model file (.safetensors: one model or an ensemble) or its "
                        ".onnx export")
    parser.add_argument("source", help="dataset name (busi, breakhis, ...), image folder or manifest CSV")
    parser.add_argument("--data", help="data root for named datasets (default: $BREASTVISION_DATA, ...)")
    parser.add_argument("--split", type=Path, help="split file (JSON) to take a subset from")
    parser.add_argument("--subset", default="test", choices=("train", "val", "test"),
                        help="part of --split to evaluate (default: test)")
    parser.add_argument("--fold", type=int, help="fold of a k-fold --split whose test part is evaluated")
    parser.add_argument("--out", type=Path, help="report folder (default: runs/evaluate/MODEL_SOURCE)")
    add_tta_options(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default: 0)")
    add_device_option(parser)
    add_operating_point_option(parser, "predictions.csv's decision column")
    parser.add_argument("--positive", help="positive class of a binary task (default: malignant)")
    parser.add_argument("--patient-level", choices=("auto", "on", "off"), default="auto",
                        help="treat the dataset's groups as patients (auto: BreakHis slides/patients)")
    parser.add_argument("--patient-context", type=float, default=0.0, metavar="W",
                        help="blend each image's probabilities with its patient's mean, weight W in [0, 1] "
                        "(choose it on validation: reproduce ablation's context step; default 0: none)")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from breastvision.evaluation.evaluate import run

    return run(args)
