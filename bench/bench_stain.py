"""Stain-normalisation throughput: breastvision's batched Macenko and Reinhard against torchstain.

All normalisers are fitted on the same reference and run on the same real BreakHis images (the
shared 200X tiles by default; the data root follows ``--data`` / ``$BREASTVISION_DATA``). torchstain
normalises one image per call, so it is timed per image; ours is timed on whole batches and one
image at a time. Each figure is the best of ``--repeats`` timed passes after one warm-up pass, in
images per second. Prints one JSON document.

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
from breastvision.data.stain import MacenkoNormalizer, ReinhardNormalizer
from breastvision.paths import dataset_dir


def _best_rate(run: Callable[[], object], count: int, repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - start)
    return round(count / best, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data root (default: $BREASTVISION_DATA, then ../shared/data)")
    parser.add_argument("--dataset", default="breakhis", help="dataset name under the data root")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = sorted(dataset_dir(args.dataset, args.data).rglob("*.png"))
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    images = torch.stack([torch.from_numpy(np.array(load_image(p))).permute(2, 0, 1) for p in paths])
    reference, on_device = images[0], images.to(device)
    batches = on_device.split(args.batch_size)

    results: dict[str, float | None] = {}
    agreement: dict[str, float | None] = {}
    fallbacks: dict[str, int] = {}
    ours = {"macenko": MacenkoNormalizer().fit(reference), "reinhard": ReinhardNormalizer().fit(reference)}
    for method, norm in ours.items():
        results[f"breastvision_{method}_batched"] = _best_rate(
            lambda norm=norm: [norm.transform(b) for b in batches], len(paths), args.repeats, device
        )
        results[f"breastvision_{method}_one_by_one"] = _best_rate(
            lambda norm=norm: [norm.transform(x) for x in on_device], len(paths), args.repeats, device
        )

    try:
        import torchstain
    except ImportError:
        torchstain = None
    for method in ours:
        key = f"torchstain_{method}"
        if torchstain is None:
            results[key] = agreement[key] = None
            continue
        # torchstain keeps its fitted matrices on the CPU, so it is timed on CPU tensors.
        if method == "macenko":
            macenko = torchstain.normalizers.MacenkoNormalizer(backend="torch")
            macenko.fit(reference)
            normalize = lambda x, macenko=macenko: macenko.normalize(x, stains=False)[0]  # noqa: E731
        else:
            reinhard = torchstain.normalizers.ReinhardNormalizer(backend="torch")
            reinhard.fit(reference)
            normalize = reinhard.normalize
        cpu = torch.device("cpu")
        results[key] = _best_rate(
            lambda normalize=normalize: [normalize(x) for x in images], len(paths), args.repeats, cpu
        )
        out, fallback = ours[method].transform(images, return_fallback=True)
        fallbacks[method] = int(fallback.sum())
        diffs = [
            (out[i].int() - normalize(images[i]).permute(2, 0, 1).int()).abs().float().mean().item()
            for i in range(len(images))
            if not fallback[i]
        ]
        agreement[key] = round(float(np.mean(diffs)), 3)

    print(
        json.dumps(
            {
                "benchmark": "stain normalisation",
                "unit": "images/s (best of repeats)",
                "dataset": args.dataset,
                "images": len(paths),
                "image_size": list(images.shape[2:]),
                "batch_size": args.batch_size,
                "device": str(device),
                "torch_threads": args.threads,
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
                "results": results,
                "mean_abs_diff_vs_torchstain_grey_levels": agreement,
                "images_left_unnormalised": fallbacks,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
