"""``breastvision predict | export | serve``: using a trained model file."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from breastvision.devices import add_device_option
from breastvision.errors import BreastvisionError
from breastvision.models.tta import TTA_SETS

#: Skipped files listed one by one before the rest are only counted by reason.
_SKIPPED_SHOWN = 20
_MODEL_HELP = "a breastvision .safetensors model file or its .onnx export"


def add_operating_point_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--operating-point", metavar="NAME",
                        help=f"the stored operating point {what} follows (e.g. youden, sensitivity>=0.95): "
                        "the malignant class when P(malignant) >= its threshold, else the most probable "
                        "other class (default: the most probable class)")


def add_tta_options(parser: argparse.ArgumentParser, what: str = "probabilities") -> None:
    """``--tta`` (the model file's own view set) and ``--tta-views SET`` (another); read back by
    :func:`tta_choice`."""
    parser.add_argument("--tta", action="store_true",
                        help=f"test-time augmentation: average the {what} over the model file's own view "
                        "set (hflip, the image and its mirror, for ultrasound models; dihedral8, the 8 "
                        "rotations/flips, for histology; the output names the set)")
    parser.add_argument("--tta-views", choices=TTA_SETS, metavar="SET",
                        help=f"average over this view set instead ({', '.join(TTA_SETS)}; implies --tta)")


def tta_choice(args: argparse.Namespace) -> bool | str:
    """What ``--tta`` / ``--tta-views`` ask of a predictor (``serving.predict.TtaChoice``)."""
    return args.tta_views or args.tta


def register(subparsers: argparse._SubParsersAction) -> None:
    _add_predict(subparsers)
    _add_export(subparsers)
    _add_serve(subparsers)


def _add_predict(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser(
        "predict", help="class probabilities for image files and folders (model file or ONNX)",
        description="Predict every image under the given files and folders with exactly the "
        "pre-processing stored in the model file. BUSI lesion masks (*_mask*) are not samples.",
    )
    predict.add_argument("model", type=Path, help=_MODEL_HELP)
    predict.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files and folders")
    predict.add_argument("--out", type=Path, help="write the table to this .csv or .json (default: print it)")
    add_tta_options(predict)
    predict.add_argument("--explain", type=Path, metavar="DIR", help="save Grad-CAM overlay PNGs here")
    predict.add_argument("--method", default="gradcam", help="CAM method for --explain (default gradcam)")
    predict.add_argument("--target-layer", action="append", metavar="MODULE",
                         help="dotted module path to explain instead of the default (repeatable)")
    predict.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    predict.add_argument("--frame", default="all", metavar="K|all",
                         help="multi-frame DICOM: predict frame K (from 1) of each, or all (default); "
                         "rows name frames file.dcm#frame=K")
    add_operating_point_option(predict, "the decision column")
    predict.add_argument("--patient-context", type=float, default=0.0, metavar="W",
                         help="one folder per patient: blend each image's probabilities with its folder's "
                         "mean, weight W in [0, 1] (chosen on validation; default 0: each image alone)")
    add_device_option(predict)
    predict.set_defaults(func=_predict)


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="export a model file to ONNX with its metadata",
        description="Export to ONNX (dynamic batch, softmax output, and for a model with a scope its "
        "out-of-scope score as a second output; the model file's metadata in metadata_props), then "
        "check it with onnx.checker and against PyTorch with onnxruntime.",
    )
    export.add_argument("model", type=Path, help="a breastvision .safetensors model file")
    export.add_argument("--onnx", type=Path, required=True, metavar="OUT", help="the .onnx file to write")
    export.add_argument("--opset", type=int, default=None, help="ONNX opset, 17 or newer (default 18)")
    export.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison")
    add_device_option(export)
    export.set_defaults(func=_export)


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="a local web page and REST API for one model",
        description="Serve an upload page (probabilities, heat-map, model card) and a JSON API "
        "(POST /api/predict, GET /api/model, GET /healthz). Loads nothing from the internet.",
    )
    serve.add_argument("model", type=Path, help=_MODEL_HELP)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    serve.add_argument("--max-megapixels", type=float, default=40.0, help="largest image (default 40 MP)")
    add_tta_options(serve, "answers' probabilities")
    serve.add_argument("--backend", choices=["auto", "pytorch", "onnxruntime"], default="auto",
                       help="where forward passes run; a .safetensors file is exported to ONNX on start "
                       "for onnxruntime, which is faster on CPUs (bench/bench_serving.py). auto (the "
                       "default): onnxruntime (with the out-of-scope score of a model with a scope) unless "
                       "the export fails, then PyTorch")
    serve.add_argument("--max-batch", type=int, default=8,
                       help="concurrent requests run as one forward pass, at most this many (default 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0,
                       help="how long a batch waits for more requests after its first (default 5 ms)")
    serve.add_argument("--inference-workers", type=int, default=None, metavar="N",
                       help="forward passes run at once, sharing the cores (default: one per core)")
    serve.add_argument("--memory-budget-mb", type=float, default=256.0,
                       help="pixel buffers of the decodes in progress, in MB (default 256)")
    serve.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                       help="seconds a client has to send the request headers (default 10)")
    serve.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                       help="seconds a client has to send the request body (default 60)")
    add_operating_point_option(serve, "the page's headline and the answer's decision")
    add_device_option(serve)
    serve.set_defaults(func=_serve)


def _predict(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from breastvision.data.transforms import describe_tta
    from breastvision.serving.predict import load_predictor, predict_paths, write_results

    if args.batch_size < 1:
        raise BreastvisionError("--batch-size must be at least 1")
    frame = _frame(args.frame)
    if args.explain:
        from breastvision.explanation.gradcam import METHODS

        if args.method not in METHODS:
            raise BreastvisionError(f"unknown --method '{args.method}' (choose from {', '.join(METHODS)})")
    predictor = load_predictor(args.model, args.device, args.operating_point)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("predicting", total=None)
        run = predict_paths(
            predictor, args.paths, tta=tta_choice(args), batch_size=args.batch_size, frame=frame,
            explain_dir=args.explain, explain_method=args.method, target_layers=args.target_layer,
            on_batch=lambda n: progress.advance(task, n), patient_context=args.patient_context,
        )
    if args.out:
        write_results(run, args.out)
        print(f"wrote {len(run.predictions)} predictions to {args.out}")
        if run.tta:
            print(f"test-time augmentation: {describe_tta(run.tta)}")
    else:
        _print_table(run)
    _report_skipped(run)
    if args.explain and run.predictions:
        print(f"heat-map overlays in {args.explain}")
    if not run.predictions:
        raise BreastvisionError("no image could be predicted")
    return 0


def _frame(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise BreastvisionError(f"--frame must be 'all' or a frame number from 1, not '{text}'")
    return int(text)


def _print_table(run) -> None:  # noqa: ANN001 - a PredictionRun
    from rich.console import Console
    from rich.table import Table

    from breastvision.paths import printable
    from breastvision.serving.predict import decision_columns

    tta = f", TTA {run.tta}" if run.tta else ""
    table = Table(title=f"{run.model['architecture']} ({run.model['backend']}{tta})")
    table.add_column("image", overflow="fold")  # wrapped, never cut: rows must stay distinguishable
    table.add_column("predicted")
    if run.decision_rule != "argmax":
        table.add_column(f"decision at {run.decision_rule}")
    for name in run.class_names:
        table.add_column(f"p({name})", justify="right")
    columns = decision_columns(run.operating_points)
    for column in columns.values():
        table.add_column(column)
    for p in run.predictions:
        decision = [p.decision] if run.decision_rule != "argmax" else []
        table.add_row(printable(p.name), p.predicted, *decision,
                      *(f"{p.probabilities[c]:.4f}" for c in run.class_names),
                      *(str(p.decisions[k]) for k in columns))
    Console().print(table)


def _report_skipped(run) -> None:  # noqa: ANN001 - a PredictionRun
    if run.masks_ignored:
        print(f"ignored {run.masks_ignored} lesion mask(s) (*_mask*): not samples", file=sys.stderr)
    for s in run.skipped[:_SKIPPED_SHOWN]:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    rest = run.skipped[_SKIPPED_SHOWN:]
    if rest:
        counts = Counter(s.reason.split(" (")[0] for s in rest)
        summary = "; ".join(f"{n}× {reason}" for reason, n in counts.most_common())
        print(f"skipped {len(rest)} more: {summary}", file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    from breastvision.serving.export import DEFAULT_OPSET, export_onnx

    result = export_onnx(args.model, args.onnx, opset=args.opset or DEFAULT_OPSET, verify=not args.no_verify,
                         device=args.device)
    diff = result.max_abs_diff
    check = "" if diff is None else f"; onnxruntime vs PyTorch max |Δp| = {diff:.1e}"
    if result.scope_diff is not None:
        check += f", scope score max relative Δ = {result.scope_diff:.1e}"
    print(f"wrote {result.path} (opset {result.opset}, passes onnx.checker{check})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from breastvision.serving.web import serve

    for flag, count in (("--max-batch", args.max_batch), ("--inference-workers", args.inference_workers)):
        if count is not None and count < 1:
            raise BreastvisionError(f"{flag} must be at least 1")
    if args.batch_wait_ms < 0:
        raise BreastvisionError("--batch-wait-ms must not be negative")
    positive = {"--memory-budget-mb": args.memory_budget_mb, "--header-timeout": args.header_timeout,
                "--body-timeout": args.body_timeout}
    for flag, value in positive.items():
        if value <= 0:
            raise BreastvisionError(f"{flag} must be positive")

    print(f"breastvision: serving {args.model} on http://{args.host}:{args.port}/  (Ctrl-C stops)")
    serve(
        args.model, host=args.host, port=args.port, backend=args.backend, tta=tta_choice(args),
        device=args.device,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=int(args.max_megapixels * 1_000_000), max_batch=args.max_batch,
        inference_workers=args.inference_workers,
        batch_wait_s=args.batch_wait_ms / 1000,
        memory_budget_bytes=int(args.memory_budget_mb * 1024 * 1024),
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        operating_point=args.operating_point,
    )
    return 0
