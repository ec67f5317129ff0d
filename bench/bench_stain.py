"""Stain-normalisation throughput: breastvision's batched Macenko and Reinhard against torchstain.

All normalisers are fitted on the same reference and run on the same real BreakHis images (the
shared 200X tiles by default; the data root follows ``--data`` / ``$BREASTVISION_DATA``). torchstain
normalises one image per call (and keeps its fitted matrices on the CPU), so it is timed per image
on CPU; ours is timed on whole batches and one image at a time, on ``--device``. After one warm-up
pass of each, the contenders are timed in turn, round after round, so that a burst of load from
other processes hits all of them alike; each figure is the best round, in images per second.
Also reports the speed ratio (ours batched / torchstain) and the absolute difference from
torchstain's output (per-image mean: overall and worst image; largest pixel difference), on the
images ours does not leave unnormalised. Prints one JSON document.

    .venv/bin/python bench/bench_stain.py --images 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from breastvision.data.io import load_image
from breastvision.data.stain import MacenkoNormalizer, ReinhardNormalizer, StainNormalizer
from breastvision.paths import dataset_dir


def _torchstain_normalizers(reference: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """torchstain's torch-backend normalisers by method, each mapping CHW uint8 to HWC; {} if absent."""
    try:
        import torchstain
    except ImportError:
        return {}
    macenko = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    macenko.fit(reference)
    reinhard = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    reinhard.fit(reference)
    return {"macenko": lambda x: macenko.normalize(x, stains=False)[0], "reinhard": reinhard.normalize}


def _interleaved_best_rates(
    runs: dict[str, Callable[[], object]], count: int, rounds: int, device: torch.device
) -> dict[str, float]:
    def timed(run: Callable[[], object]) -> float:
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for run in runs.values():
        timed(run)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run))
    return {name: round(count / seconds, 1) for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data root (default: $BREASTVISION_DATA, then ../shared/data)")
    parser.add_argument("--dataset", default="breakhis", help="dataset name under the data root")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = sorted(dataset_dir(args.dataset, args.data).rglob("*.png"))
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    images = torch.stack([torch.from_numpy(np.array(load_image(p))).permute(2, 0, 1) for p in paths])
    reference, on_device = images[0], images.to(device)
    batches = on_device.split(args.batch_size)

    ours: dict[str, StainNormalizer] = {
        "macenko": MacenkoNormalizer().fit(reference),
        "reinhard": ReinhardNormalizer().fit(reference),
    }
    theirs = _torchstain_normalizers(reference)
    runs: dict[str, Callable[[], object]] = {}
    for method, norm in ours.items():
        runs[f"breastvision_{method}_batched"] = lambda norm=norm: [norm.transform(b) for b in batches]
        runs[f"breastvision_{method}_one_by_one"] = lambda norm=norm: [norm.transform(x) for x in on_device]
        if method in theirs:
            runs[f"torchstain_{method}"] = lambda f=theirs[method]: [f(x) for x in images]
    rates = _interleaved_best_rates(runs, len(paths), args.rounds, device)

    agreement: dict[str, dict[str, float] | None] = {}
    left_unnormalised: dict[str, int] = {}
    for method, norm in ours.items():
        out, fallback = norm.transform(images, return_fallback=True)
        left_unnormalised[method] = int(fallback.sum())
        if method not in theirs:
            agreement[method] = None
            continue
        diffs = [
            (out[i].int() - theirs[method](images[i]).permute(2, 0, 1).int()).abs().float()
            for i in range(len(images))
            if not fallback[i]
        ]
        agreement[method] = {
            "worst_image_mean": round(max(d.mean().item() for d in diffs), 3),
            "mean": round(float(np.mean([d.mean().item() for d in diffs])), 3),
            "max_pixel": max(d.max().item() for d in diffs),
        }
    ratios = {
        method: round(rates[f"breastvision_{method}_batched"] / rates[f"torchstain_{method}"], 2)
        for method in theirs
    }

    print(
        json.dumps(
            {
                "benchmark": "stain normalisation",
                "unit": f"images/s, best of {args.rounds} interleaved rounds",
                "dataset": args.dataset,
                "images": len(paths),
                "image_size": list(images.shape[2:]),
                "batch_size": args.batch_size,
                "device": str(device),
                "torch_threads": args.threads,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "torchstain": "absent" if not theirs else "torch backend, one image per call, CPU",
                "images_per_s": rates,
                "batched_over_torchstain": ratios,
                "abs_diff_vs_torchstain_grey_levels": agreement,
                "images_left_unnormalised": left_unnormalised,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
