"""``breastvision train``, ``transfer``, ``crossval`` and ``ensemble``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from breastvision.devices import add_device_option


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_train(subparsers)
    _add_transfer(subparsers)
    _add_crossval(subparsers)
    _add_ensemble(subparsers)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train one model from a YAML config (CPU, GPU or several processes)",
        description="Train one model from a YAML config and write its run folder (model, history, report).",
    )
    train.add_argument(
        "config", type=Path, metavar="CONFIG", help="experiment YAML: a path, or a shipped config's name"
    )
    _overrides(train)
    train.add_argument("--resume", type=Path, metavar="CKPT", help="continue from a checkpoint (last.ckpt)")
    train.add_argument(
        "--out", type=Path, metavar="DIR", help="run folder (default: the config's output_dir)"
    )
    train.set_defaults(func=run_train)


def _add_transfer(subparsers: argparse._SubParsersAction) -> None:
    transfer = subparsers.add_parser(
        "transfer",
        help="multi-level transfer learning: train a chain of stages, each from the previous model",
        description="Train every stage of a chain config in order (finished stages are reused). "
        "Overrides apply to every stage; prefix a key with a stage name to target one stage.",
    )
    transfer.add_argument(
        "config", type=Path, metavar="CONFIG",
        help="chain YAML: a path or a shipped config's name (e.g. breakhis_multilevel_cpu.yaml)",
    )
    _overrides(transfer)
    transfer.add_argument("--out", type=Path, metavar="DIR", help="folder of the stages' run folders")
    transfer.set_defaults(func=run_transfer)


def _add_crossval(subparsers: argparse._SubParsersAction) -> None:
    crossval = subparsers.add_parser(
        "crossval",
        help="k-fold cross-validation of a config: train every fold, pool the out-of-fold predictions",
        description="Train data.fold=0..K-1 of a group_kfold config into DIR/fold<k> (finished folds "
        "are reused, interrupted ones resumed) and write the pooled report into DIR.",
    )
    crossval.add_argument(
        "config", type=Path, metavar="CONFIG",
        help="experiment YAML with a k-fold split (a path or a shipped name)",
    )
    crossval.add_argument("--folds", type=int, default=5, metavar="K", help="number of folds (default 5)")
    _overrides(crossval)
    crossval.add_argument(
        "--out", type=Path, metavar="DIR", help="folder of the folds (default: the config's output_dir)"
    )
    crossval.add_argument(
        "--ensemble", action="store_true",
        help="also write DIR/ensemble.safetensors: the k fold models as one ensemble model file, with "
        "no temperature or operating points of its own (every CV image is in some fold's training data); "
        "fit them with 'breastvision ensemble DIR/ensemble.safetensors --calibrate-on DATA --out FILE'",
    )
    crossval.set_defaults(func=run_crossval)


def _add_ensemble(subparsers: argparse._SubParsersAction) -> None:
    ensemble = subparsers.add_parser(
        "ensemble",
        help="combine model files or run folders into one ensemble model file",
        description="Write one model file whose prediction is the mean of its members' calibrated "
        "probabilities. Members may differ in architecture but must share class names and pre-processing. "
        "Each member keeps its own temperature; members' operating points and out-of-scope statistics are "
        "not carried over. Without --calibrate-on the file has no temperature of its own (T = 1) and no "
        "operating points (no decision columns); with it, both are fitted on that data as training fits "
        "them on validation. Never calibrate on images a member trained or validated on (e.g. a "
        "cross-validation's folds): the members' split files are checked where they are recorded.",
    )
    ensemble.add_argument("models", nargs="+", type=Path, metavar="RUN_OR_MODEL",
                          help="model files (.safetensors) or run folders; ensembles given are flattened")
    ensemble.add_argument("--out", type=Path, required=True, metavar="FILE", help="the ensemble model file")
    ensemble.add_argument(
        "--calibrate-on", metavar="DATA",
        help="labelled dataset name, image folder or manifest, held out from every member's training and "
        "validation: fit the ensemble's temperature and operating points there")
    ensemble.add_argument("--data", type=Path, metavar="DIR",
                          help="data root for a dataset name in --calibrate-on")
    add_device_option(ensemble)
    ensemble.set_defaults(func=run_ensemble)


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, metavar="DIR",
        help="data root holding the named datasets (data.source: busi, breakhis, ...) and, beside it, "
        "weights/ (sets data.root; default: $BREASTVISION_DATA, else ../shared/data, else ./data)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 (repeatable)",
    )


def overrides(args: argparse.Namespace) -> list[str]:
    """``--data`` as the ``data.root`` override, then the ``--set`` ones (which win)."""
    data = [f"data.root={Path(args.data).expanduser().resolve()}"] if args.data else []
    return [*data, *args.overrides]


def run_train(args: argparse.Namespace) -> int:
    from breastvision.evaluation.report import print_run_headline
    from breastvision.training.config import load_config
    from breastvision.training.engine import train

    record = train(load_config(args.config, overrides(args)), resume=args.resume, out=args.out)
    if _first_process():
        print_run_headline(record.run_dir)
    return 0


def run_crossval(args: argparse.Namespace) -> int:
    from breastvision.evaluation.report import print_run_headline
    from breastvision.training.crossval import run_crossval as crossval

    print_run_headline(crossval(args.config, args.folds, overrides(args), args.out,
                                ensemble=args.ensemble).out_dir)
    return 0


def run_ensemble(args: argparse.Namespace) -> int:
    from breastvision.models.ensemble import ensemble_files

    written = ensemble_files(args.models, args.out, calibrate_on=args.calibrate_on,
                             data=str(args.data) if args.data else None, device=args.device)
    fitted = (f", calibrated on {args.calibrate_on}" if args.calibrate_on
              else " (no temperature or operating points of its own)")
    print(f"ensemble of {len(args.models)} written to {written}{fitted}")
    return 0


def run_transfer(args: argparse.Namespace) -> int:
    from breastvision.evaluation.report import print_run_headline
    from breastvision.training.transfer import run_chain

    print_run_headline(run_chain(args.config, overrides(args), args.out)[-1].run_dir)
    return 0


def _first_process() -> bool:
    """A DDP run re-runs this command once per process; only the first prints the summary."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
