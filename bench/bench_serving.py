"""Serving benchmark: single-image CPU latency (PyTorch and ONNX Runtime) and REST under load.

For each model — model files given with ``--model``, else the two published architectures built
with random weights (timing does not depend on the weights) — it measures, on the CPU:

- ``preprocess``: ``load_image`` + ``preprocess_image`` (stain normalisation included when the
  model file has a normaliser, as System H's does);
- ``pytorch`` and ``onnxruntime``: one pre-processed image (batch 1) through the model, after
  ``--warmup`` untimed runs; p50 / p95 over ``--runs``;
- ``rest``: ``--requests`` POST /api/predict at ``--concurrency`` against a server started here on
  127.0.0.1 (a bounded loop: it stops by itself), with the error count and p50 / p99 latency.

Prints one JSON document (also written to ``--out``). Example::

    python bench/bench_serving.py --runs 30 --requests 200 --concurrency 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from breastvision.data.io import load_image
from breastvision.data.stain import fit_normalizer
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.models.registry import create_model
from breastvision.paths import dataset_dir
from breastvision.serving.export import export_onnx
from breastvision.serving.predict import is_mask, load_predictor
from breastvision.serving.web import background_server, create_app

#: The published systems: System U's fusion on BUSI classes, System H's DenseNet-121+SE on BreakHis.
DEFAULT_MODELS = {
    "fusion_resnet18_vitb16": {"classes": ["benign", "malignant", "normal"], "resize": 256, "data": "busi"},
    "densenet121_se": {"classes": ["benign", "malignant"], "resize": None, "data": "breakhis_samples"},
}


def _percentiles(samples_s: list[float], *qs: int) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in qs} | {"n": len(samples_s)}


def _time(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _sample_image(data: str, data_root: str | None) -> Path | None:
    """The first real image of the model's data set, or None when the data is not here."""
    try:
        root = dataset_dir(data, data_root)
    except Exception:  # noqa: BLE001 - any absence means "use a generated image"
        return None
    return next((p for p in sorted(root.rglob("*.png")) if not is_mask(p)), None)


def _generated_image(work: Path) -> Path:
    """A BreakHis-sized (700×460) noise image, when no real one is at hand."""
    path = work / "generated.png"
    if not path.exists():
        pixels = np.random.default_rng(0).integers(0, 256, (460, 700, 3), np.uint8)
        Image.fromarray(pixels).save(path)
    return path


def _build_model_file(architecture: str, spec: dict[str, Any], image: Path | None, out_dir: Path) -> Path:
    torch.manual_seed(0)
    model = create_model(architecture, num_classes=len(spec["classes"]))
    stain = None
    if spec["data"].startswith("breakhis") and image is not None:
        stain = fit_normalizer("macenko", reference=image).state_dict()
    bundle = ModelBundle(
        architecture, spec["classes"], model.state_dict(), model_kwargs=model.model_kwargs,
        preprocessing=Preprocessing(input_size=224, resize=spec["resize"], stain=stain),
        lineage=[{"stage": "benchmark", "weights": "random init"}],
    )
    return bundle.save(out_dir / f"{architecture}.safetensors")


def _rest(model_file: Path, image_bytes: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    import httpx

    app = create_app(model_file)
    latencies: list[float] = []
    errors: list[str] = []
    with background_server(app) as url, httpx.Client(
        base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)
    ) as client:
        def one(_: int) -> None:
            start = time.perf_counter()
            try:
                files = {"file": ("image.png", image_bytes, "image/png")}
                response = client.post("/api/predict", files=files)
                ok = response.status_code == 200 and "probabilities" in response.json()
                if not ok:
                    errors.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as err:
                errors.append(repr(err))
            latencies.append(time.perf_counter() - start)

        one(0)  # warm the server (first request pays for lazy imports)
        latencies.clear()
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    return {
        "requests": requests, "concurrency": concurrency, "errors": len(errors),
        "error_examples": sorted(set(errors))[:5], **_percentiles(latencies, 50, 99),
        "wall_s": round(wall, 2), "throughput_rps": round(requests / wall, 2),
    }


def bench_model(model_file: Path, image: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    torch_predictor = load_predictor(model_file)
    params = sum(p.numel() for p in torch_predictor.model.parameters())
    picture = load_image(image)
    tensor = torch_predictor.preprocess(picture)[None]
    result: dict[str, Any] = {
        "model_file": str(model_file), "architecture": torch_predictor.info.architecture,
        "parameters_m": round(params / 1e6, 2), "input_size": torch_predictor.preprocessing.input_size,
        "stain_normaliser": (torch_predictor.preprocessing.stain or {}).get("method"),
        "image": {"path": str(image), "size": list(picture.size)},
    }
    print(f"[bench] {result['architecture']}: pre-processing", file=sys.stderr)
    result["preprocess"] = _percentiles(
        _time(lambda: torch_predictor.preprocess(load_image(image)), args.runs, args.warmup), 50, 95
    )
    print(f"[bench] {result['architecture']}: PyTorch", file=sys.stderr)
    result["pytorch"] = _percentiles(
        _time(lambda: torch_predictor.probabilities(tensor), args.runs, args.warmup), 50, 95
    )
    print(f"[bench] {result['architecture']}: ONNX export and ONNX Runtime", file=sys.stderr)
    exported = export_onnx(model_file, work / f"{model_file.stem}.onnx")
    onnx_predictor = load_predictor(exported.path)
    result["onnx_export"] = {"opset": exported.opset, "max_abs_diff_vs_pytorch": exported.max_abs_diff}
    result["onnxruntime"] = _percentiles(
        _time(lambda: onnx_predictor.probabilities(tensor), args.runs, args.warmup), 50, 95
    )
    result["onnxruntime"]["max_abs_diff_vs_pytorch"] = float(
        np.abs(onnx_predictor.probabilities(tensor) - torch_predictor.probabilities(tensor)).max()
    )
    if args.requests:
        print(f"[bench] {result['architecture']}: {args.requests} REST requests", file=sys.stderr)
        result["rest"] = _rest(model_file, image.read_bytes(), args.requests, args.concurrency)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="model file(s); default: both published "
                        "architectures with random weights")
    parser.add_argument("--image", type=Path, help="image to time (default: one from the model's data)")
    parser.add_argument("--data", help="data root (default: breastvision.paths rules)")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch / onnxruntime threads")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        jobs: list[tuple[Path, Path]] = []
        if args.model:
            jobs = [(m, args.image or _generated_image(work)) for m in args.model]
        else:
            for architecture, spec in DEFAULT_MODELS.items():
                image = args.image or _sample_image(spec["data"], args.data) or _generated_image(work)
                print(f"[bench] building {architecture} (random weights)", file=sys.stderr)
                jobs.append((_build_model_file(architecture, spec, image, work), image))
        report = {
            "machine": {
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(), "python": platform.python_version(),
                "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                "load_average_at_start": list(os.getloadavg()),
            },
            "settings": {"runs": args.runs, "warmup": args.warmup, "batch": 1},
            "models": [bench_model(model_file, image, args, work) for model_file, image in jobs],
        }
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(m.get("rest", {}).get("errors", 0) == 0 for m in report["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
