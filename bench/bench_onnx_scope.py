"""A model file with a scope by PyTorch and by its ONNX export, which computes the out-of-scope score
in its graph: per-image latency, interleaved image by image (the order alternating, so neither
back-end always runs on a warmer cache), and how far apart the two are — probabilities, scope scores
and flags — on real images plus two far outside (colour noise, a constant grey)::

    .venv/bin/python bench/bench_onnx_scope.py runs/quickstart/model.safetensors ../shared/data/busi

Prints JSON; run it with ``OMP_NUM_THREADS=1`` for single-threaded numbers (both back-ends take
torch's thread count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from breastvision.serving.export import export_onnx
from breastvision.serving.predict import discover_images, load_predictor


def _inputs(predictor, folder: Path, n: int) -> tuple[list[str], torch.Tensor]:
    """``n`` images spread evenly over the folder's sorted images (every class), pre-processed once."""
    found = [path for path, _ in discover_images([folder]).images]
    chosen = [found[i] for i in np.linspace(0, len(found) - 1, n).round().astype(int)]
    return [p.name for p in chosen], torch.stack([predictor.prepare_file(p) for p in chosen])


def _far(predictor) -> torch.Tensor:
    noise = np.random.default_rng(0).integers(0, 256, (480, 560, 3), dtype=np.uint8)
    images = [Image.fromarray(noise), Image.new("RGB", (560, 480), (128, 128, 128))]
    return torch.stack([predictor.preprocess(image) for image in images])


def run(model: Path, folder: Path, n: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        exported = export_onnx(model, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - started
        predictors = {"pytorch": load_predictor(model), "onnxruntime": load_predictor(exported.path)}
    if predictors["pytorch"].info.scope is None:
        raise SystemExit(f"{model} has no scope")
    names, batch = _inputs(predictors["pytorch"], folder, n)
    times: dict[str, list[float]] = {name: [] for name in predictors}
    order = list(predictors)
    for name in order:  # warm-up, not timed
        predictors[name].assess(batch[:1])
    for _ in range(rounds):
        for image in batch:
            order.reverse()
            for name in order:
                start = time.perf_counter()
                predictors[name].assess(image[None])
                times[name].append((time.perf_counter() - start) * 1000)
    everything = torch.cat([batch, _far(predictors["pytorch"])])
    torch_out, onnx_out = (predictors[name].assess(everything) for name in ("pytorch", "onnxruntime"))
    threshold = predictors["pytorch"].info.scope.threshold
    torch_flags, onnx_flags = torch_out.scores > threshold, onnx_out.scores > threshold
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": str(model), "architecture": predictors["pytorch"].info.architecture,
        "scope_layers": predictors["pytorch"].info.scope.layer_names, "threads": torch.get_num_threads(),
        "images": len(names), "rounds": rounds, "export_s": round(export_s, 1),
        "export_check": {"max_abs_dp": exported.max_abs_diff, "scope_max_rel_diff": exported.scope_diff},
        **{f"{name}_ms_median": round(m, 1) for name, m in medians.items()},
        "pytorch_over_onnxruntime": round(medians["pytorch"] / medians["onnxruntime"], 2),
        "max_abs_dp": float(np.abs(torch_out.probs - onnx_out.probs).max()),
        "scope_max_abs_diff": float(np.abs(torch_out.scores - onnx_out.scores).max()),
        "scope_max_rel_diff": float((np.abs(torch_out.scores - onnx_out.scores)
                                     / np.maximum(1.0, np.abs(torch_out.scores))).max()),
        "threshold": threshold,
        "scores_real": [round(float(s), 3) for s in torch_out.scores[:len(names)]],
        "scores_far": [round(float(s), 1) for s in torch_out.scores[len(names):]],
        "flags_agree": int((torch_flags == onnx_flags).sum()), "flags_total": len(torch_flags),
        "flagged_real": int(torch_flags[:len(names)].sum()),
        "flagged_far": int(torch_flags[len(names):].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a .safetensors model file with a scope")
    parser.add_argument("folder", type=Path, help="a folder of images the model is for")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.folder, args.images, args.rounds), indent=2))


if __name__ == "__main__":
    main()
