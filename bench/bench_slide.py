"""Whole-slide throughput: ``breastvision predict-slide`` on a generated slide of real BreakHis fields.

The slide is a pyramidal tiled TIFF (``--slide-mpp`` µm per pixel, 3 levels) whose grid cells are
BreakHis 200X fields from ``breakhis_200x_224``, each resized back to its physical field at that
pixel size (the 224×224 copy squashed 700×460 fields), and white glass in every third cell. The
model is System H's architecture at full size: ``--model``, or DenseNet-121+SE built with the
shared ImageNet weights and an untrained head (timing does not depend on the head), Macenko
normaliser fitted on a BreakHis 200X original, scale of a BreakHis 200X model at 224 pixels.

Prints the command's own summary JSON (tiles/s counts the whole slide: opening, tissue mask,
reading, stain normalisation, forward passes) and writes the outputs, heat-map included, under
``--out``. Example::

    python bench/bench_slide.py --columns 24 --rows 16 --out runs/bench_slide
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from breastvision.cli import main as cli
from breastvision.data.readers.breakhis import (
    FIELD_PIXELS,
    input_mpp,
    microns_per_pixel,
    read_breakhis_manifest,
)
from breastvision.data.stain import fit_normalizer
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model
from breastvision.paths import dataset_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from slide_mosaic import mosaic, write_pyramid  # noqa: E402 - the tests' slide builder

WEIGHTS = Path("../shared/weights/densenet121_imagenet_keras.safetensors")


def build_model(out: Path, records: list, reference: Path | None) -> Path:
    torch.manual_seed(0)
    pretrained = str(WEIGHTS) if WEIGHTS.is_file() else None
    model = create_model("densenet121_se", num_classes=2, pretrained=pretrained)
    stain = fit_normalizer("macenko", reference=reference).state_dict() if reference else None
    bundle = ModelBundle(
        "densenet121_se", ["benign", "malignant"], model.state_dict(), model_kwargs=model.model_kwargs,
        preprocessing=Preprocessing(input_size=224, stain=stain, mpp=input_mpp(records, 224)),
        lineage=[{"stage": "benchmark", "weights": pretrained or "random init", "head": "untrained"}],
    )
    return bundle.save(out / "densenet121_se_bench.safetensors")


def build_slide(out: Path, records: list, columns: int, rows: int, slide_mpp: float) -> Path:
    mpp = microns_per_pixel(200)
    cell = (round(FIELD_PIXELS[0] * mpp[0] / slide_mpp), round(FIELD_PIXELS[1] * mpp[1] / slide_mpp))
    images = iter(records * (columns * rows // max(1, len(records)) + 1))
    cells = [[None if (r + c) % 3 == 0 else Image.open(next(images).path) for c in range(columns)]
             for r in range(rows)]
    return write_pyramid(out / "breakhis_mosaic.tif", mosaic(cells, cell), slide_mpp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model file (default: DenseNet-121+SE, see above)")
    parser.add_argument("--data", help="data root (default: breastvision.paths rules)")
    parser.add_argument("--columns", type=int, default=24)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--slide-mpp", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("runs/bench_slide"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    root = dataset_dir("breakhis", args.data)
    records = read_breakhis_manifest(root / "manifest.csv").records
    reference = next(iter(sorted(dataset_dir("breakhis_samples", args.data).glob("*-200-*.png"))), None)
    model = args.model or build_model(args.out, records, reference)
    started = time.perf_counter()
    slide = build_slide(args.out, records, args.columns, args.rows, args.slide_mpp)
    print(f"slide built in {time.perf_counter() - started:.1f} s: {slide}", file=sys.stderr)
    code = cli(["predict-slide", str(model), str(slide), "--out", str(args.out),
                "--batch-size", str(args.batch_size)])
    summary = json.loads((args.out / "breakhis_mosaic_summary.json").read_text())
    print(json.dumps({"threads": args.threads, "batch_size": args.batch_size, **summary}, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
