"""Cold feature caching: the frozen prefix computed by eager PyTorch against ONNX Runtime.

Builds a config's model with its pretrained weights (by default the BreakHis CPU config: DenseNet-121
from ImageNet, stem … transition3 frozen) and computes the frozen prefix's features for the same
real images (the shared BreakHis 200X tiles by default, pre-processed as the config says) through
``training.feature_cache.FeatureCache``, memory only, once per backend: exactly the work of a cold
run. ONNX Runtime's one-off export and check are timed on their own (``onnx_setup_s``); then the
backends are timed in turn, round after round, so that load from other processes hits both alike,
and each figure is the best round in images per second. Also reports the largest absolute
difference between the two backends' features. Prints one JSON document.

    .venv/bin/python bench/bench_cache.py --images 64 --threads 2
    .venv/bin/python bench/bench_cache.py --config configs/busi_fusion_cpu_noaug.yaml --dataset busi
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.utils.data import Dataset

from breastvision.data.io import load_image
from breastvision.data.transforms import preprocess_image
from breastvision.models.bundle import Preprocessing
from breastvision.models.registry import data_config
from breastvision.paths import dataset_dir
from breastvision.training.config import load_config
from breastvision.training.engine import build_model
from breastvision.training.feature_cache import FeatureCache
from breastvision.training.freezing import freeze_before

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Images(Dataset):
    """(pre-processed image, label, index) items, as the engine's view datasets yield them."""

    def __init__(self, paths: list[Path], preprocessing: Preprocessing) -> None:
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return preprocess_image(load_image(self.paths[i]), self.preprocessing), 0, i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIGS / "breakhis_densenet_block4_cpu.yaml"))
    parser.add_argument("--data", help="data root (default: $BREASTVISION_DATA, then ../shared/data)")
    parser.add_argument("--dataset", default="breakhis", help="dataset name under the data root")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="loader batch (the engine's eval batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    model, _ = build_model(config, num_classes=2)
    prefix, _ = freeze_before(model, config.model.first_trainable_stage)
    # The engine's own pre-processing minus the training scale, which needs a data set read.
    expected = data_config(model)
    preprocessing = Preprocessing.parse(
        {
            "input_size": config.data.input_size or int(expected["input_size"][-1]),
            "resize": config.data.resize,
            "mean": tuple(config.data.mean or expected["mean"]),
            "std": tuple(config.data.std or expected["std"]),
        },
        "bench",
    )
    paths = sorted(p for p in dataset_dir(args.dataset, args.data).rglob("*.png") if "_mask" not in p.name)
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    dataset = _Images(paths, preprocessing)
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    backends = ("eager", "onnxruntime")
    caches = {name: FeatureCache(prefix, None, {}, backend=name, onnx_min_views=0) for name in backends}

    def run(backend: str) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        views = ["identity"] * len(paths)
        features = caches[backend].features(dataset, paths, views, fabric, args.batch_size)
        return features, time.perf_counter() - start

    # First ONNX call: export, session and the check against eager on its first images, timed alone.
    start = time.perf_counter()
    caches["onnxruntime"].features(dataset, paths[:1], ["identity"], fabric, 1)
    setup = time.perf_counter() - start
    best = dict.fromkeys(caches, float("inf"))
    features: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for backend in caches:
            features[backend], seconds = run(backend)
            best[backend] = min(best[backend], seconds)
    rates = {backend: round(len(paths) / seconds, 2) for backend, seconds in best.items()}
    onnx = caches["onnxruntime"]
    print(
        json.dumps(
            {
                "benchmark": "cold feature caching (frozen prefix)",
                "unit": f"images/s, best of {args.rounds} interleaved rounds, image loading included",
                "config": Path(args.config).name,
                "architecture": config.model.name,
                "frozen_before": config.model.first_trainable_stage,
                "dataset": args.dataset,
                "images": len(paths),
                "input": list(dataset[0][0].shape),
                "feature_shape": list(features["eager"].shape[1:]),
                "batch_size": args.batch_size,
                "torch_threads": args.threads,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "images_per_s": rates,
                "onnxruntime_over_eager": round(rates["onnxruntime"] / rates["eager"], 2),
                "onnx_setup_s": round(setup, 1),
                "onnx_backend_used": onnx.backend,
                "onnx_backend_note": onnx.backend_note,
                "max_abs_diff": float((features["onnxruntime"] - features["eager"]).abs().max()),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
