"""``breastvision predict-slide``: a patch model over whole-slide images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from breastvision.devices import add_device_option
from breastvision.errors import BreastvisionError
from breastvision.serving.cli import add_tta_options, tta_choice


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict-slide", help="tile whole-slide images and predict every tissue tile (System H models)",
        description="Open each slide with OpenSlide (SVS, NDPI, MRXS, pyramidal TIFF, DICOM-WSI, ...), "
        "find the tissue, tile it at the scale the model was trained at, predict each tile with the model "
        "file's own pre-processing (stain normaliser included) and write per slide into --out: "
        "<slide>_tiles.csv, <slide>_tiles.geojson (QuPath), <slide>_heatmap.png and <slide>_summary.json. "
        "Slide score: mean p(positive) over tissue tiles and the fraction of tiles at or above --threshold.",
    )
    parser.add_argument("model", type=Path, help="a breastvision .safetensors model file or its .onnx export")
    parser.add_argument("slides", type=Path, nargs="+", metavar="SLIDE", help="whole-slide image files")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the outputs")
    parser.add_argument("--mpp", metavar="X[,Y]",
                        help="the slides' µm per level-0 pixel, overriding (or standing in for) their own")
    parser.add_argument("--mpp-model", metavar="X[,Y]",
                        help="µm per pixel of the model input, for model files that do not record it")
    parser.add_argument("--min-tissue", type=float, default=0.5,
                        help="least tissue fraction of a predicted tile (default 0.5; 0: every tile)")
    parser.add_argument("--positive", help="the class the slide score is about (default: malignant)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="p(positive) at which a tile counts as positive (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass (default 16)")
    add_tta_options(parser, "tiles' probabilities")
    parser.add_argument("--heatmap-size", type=int, default=2048, help="longest side of the heat-map PNG")
    add_device_option(parser)
    parser.set_defaults(func=_predict_slide)


def _predict_slide(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from breastvision.data.records import Skipped
    from breastvision.paths import printable
    from breastvision.serving.predict import load_predictor
    from breastvision.slide.outputs import write_outputs
    from breastvision.slide.predict import positive_class, predict_slide, summarize
    from breastvision.slide.reader import SlideError, parse_mpp
    from breastvision.slide.scale import model_scale

    if args.batch_size < 1:
        raise BreastvisionError("--batch-size must be at least 1")
    predictor = load_predictor(args.model, args.device)
    model_mpp = model_scale(predictor.preprocessing, parse_mpp(args.mpp_model))
    positive = positive_class(predictor.class_names, args.positive)
    slide_mpp = parse_mpp(args.mpp)
    done, skipped = 0, []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("opening", total=None)
        for path in args.slides:
            progress.update(task, description=f"{path.name}: tissue", completed=0, total=None)
            try:
                run = predict_slide(
                    predictor, path, model_mpp, slide_mpp=slide_mpp, min_tissue=args.min_tissue,
                    batch_size=args.batch_size, tta=tta_choice(args), thumbnail_side=args.heatmap_size,
                    on_start=lambda name, n: progress.update(task, description=name, completed=0, total=n),
                    on_batch=lambda n: progress.advance(task, n),
                )
            except SlideError as err:
                skipped.append(Skipped(path, str(err).removeprefix(f"{printable(path)}: ")))
                continue
            summary = summarize(run, predictor, model_mpp, positive, args.threshold)
            files = write_outputs(run, args.out, summary, positive, args.heatmap_size)
            progress.console.print(_headline(summary, files), soft_wrap=True, markup=False, highlight=False)
            if min(run.geometry.zoom) < 1:
                print(f"warning: {run.name} is coarser than the model's training scale: tiles were enlarged "
                      f"{1 / min(run.geometry.zoom):.2f}× to reach it", file=sys.stderr)
            done += 1
    for s in skipped:
        print(f"skipped {printable(s.path)}: {s.reason}", file=sys.stderr)
    if not done:
        raise BreastvisionError("no slide could be predicted")
    return 0


def _headline(summary: dict, files: dict[str, str]) -> str:
    tiles, score = summary["tiles"], summary["score"]
    scored = (f"score {score:.3f} (mean p({summary['positive_class']})), "
              f"{summary['fraction_above_threshold']:.1%} of tiles >= {summary['threshold']:g}"
              if score is not None else "no tissue tile: no score")
    rate = f" ({summary['tiles_per_second']:.1f} tiles/s)" if summary["tiles_per_second"] else ""
    return (f"{Path(summary['slide']['file']).name}: {scored}; {tiles['tissue']} tissue tiles predicted, "
            f"{tiles['background_skipped']} background skipped, {summary['seconds']:.1f} s{rate}; "
            f"heat-map {files['heatmap']}, summary {files['summary']}")
