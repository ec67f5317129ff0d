"""Training throughput and peak memory per model: frozen prefix run every step vs cached features.

For each setup (a model and its first trainable stage, as the configs use them) the engine's own
``train_one_epoch`` runs on the engine's Fabric (``--device``, ``--precision``) twice: *uncached*,
the frozen prefix runs on every batch of images; *cached*, the suffix trains on the prefix's outputs
computed beforehand (the feature cache's job, whose one-off cost is reported as
``cache_build_images_per_s``). Inputs are random tensors already in memory, so the figures are the
model's compute, not image decoding or augmentation. Weights are random: speed does not depend on
them. Each figure is the best of ``--rounds`` timed epochs after one warm-up epoch, in training
images per second; peak memory is the CUDA allocator's peak, or on CPU the rise of the process's
resident memory during the timed epochs (sampled every 2 ms from /proc). Prints one JSON document.

    .venv/bin/python bench/bench_train.py                 # defaults: 224 px, batch 16, 4 steps
    .venv/bin/python bench/bench_train.py --tiny          # 64 px, batch 4, 2 steps, small models
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from breastvision.models.registry import create_model
from breastvision.training.config import TrainConfig
from breastvision.training.devices import make_fabric, resolve_precision
from breastvision.training.freezing import freeze_before
from breastvision.training.loop import FeatureDataset, train_one_epoch

#: name → (registered model, its keyword arguments, first trainable stage): what the configs train.
SETUPS: dict[str, tuple[str, dict[str, Any], str]] = {
    "densenet121@denseblock4": ("densenet121", {}, "denseblock4"),
    "densenet121_se@denseblock4": ("densenet121_se", {}, "denseblock4"),
    "densenet121_se@denseblock3": ("densenet121_se", {}, "denseblock3"),
    "fusion_resnet18_vitb16@head": ("fusion_resnet18_vitb16", {}, "head"),
    "fusion_densenet121_vit_tiny@head": ("fusion", {"cnn": "densenet121", "vit": "vit_tiny"}, "head"),
    "resnet18@layer4": ("resnet18", {}, "layer4"),
}
DEFAULT = [k for k in SETUPS if not k.startswith("resnet18")]
TINY = ["resnet18@layer4", "densenet121_se@denseblock4"]


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """``{"peak_mb": ...}`` filled in on exit: CUDA allocator peak, or the resident-memory rise."""
    result: dict[str, float | None] = {"peak_mb": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        result["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        return
    if not Path("/proc/self/statm").is_file():
        yield result
        return
    start, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = round(max(0, peak[0] - start) / 2**20, 1)


def _timed(run: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def _prefix_outputs(fabric: Any, prefix: nn.Module, images: torch.Tensor, batch: int) -> torch.Tensor:
    out = []
    for chunk in images.split(batch):
        with fabric.autocast():
            out.append(prefix(fabric.to_device(chunk)).float().cpu())
    return torch.cat(out)


def _build(name: str, fabric: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    arch, kwargs, stage = SETUPS[name]
    torch.manual_seed(0)
    model = create_model(arch, num_classes=2, **kwargs)
    prefix, suffix = freeze_before(model, stage)
    return model.to(fabric.device), prefix, suffix


def _train_rate(
    name: str, fabric: Any, inputs: torch.Tensor, labels: list[int], batch: int, rounds: int, run_prefix: bool
) -> tuple[float, float | None]:
    """Best training images/s over ``rounds`` epochs, and peak memory, of a fresh model and optimiser
    (so the uncached and cached runs time the same arithmetic)."""
    _, prefix, suffix = _build(name, fabric)
    step_prefix = prefix if run_prefix else nn.Identity()
    optimizer = torch.optim.SGD([p for p in suffix.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    trainable, optimizer = fabric.setup(suffix, optimizer)
    loss_fn = nn.CrossEntropyLoss()

    def epoch(data: DataLoader) -> None:
        train_one_epoch(fabric, trainable, step_prefix, data, optimizer, loss_fn)

    epoch(DataLoader(FeatureDataset(inputs[:batch], labels[:batch]), batch_size=batch))  # warm-up
    loader = DataLoader(FeatureDataset(inputs, labels), batch_size=batch)
    with peak_memory(fabric.device) as memory:
        best = min(_timed(lambda: epoch(loader), fabric.device) for _ in range(rounds))
    return round(len(inputs) / best, 2), memory["peak_mb"]


def measure(name: str, fabric: Any, size: int, batch: int, steps: int, rounds: int) -> dict[str, Any]:
    model, prefix, suffix = _build(name, fabric)
    images = torch.randn(batch * steps, 3, size, size)
    labels = torch.randint(0, 2, (batch * steps,)).tolist()
    _prefix_outputs(fabric, prefix, images[:batch], batch)  # warm-up
    build = _timed(lambda: _prefix_outputs(fabric, prefix, images, batch), fabric.device)
    features = _prefix_outputs(fabric, prefix, images, batch)
    row: dict[str, Any] = {
        "setup": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in suffix.parameters() if p.requires_grad),
        "feature_shape": list(features.shape[1:]),
        "cache_build_images_per_s": round(len(images) / build, 2),
    }
    for mode, inputs in (("uncached", images), ("cached", features)):
        rate, peak = _train_rate(name, fabric, inputs, labels, batch, rounds, run_prefix=mode == "uncached")
        row[f"{mode}_images_per_s"], row[f"{mode}_peak_mb"] = rate, peak
    row["speedup"] = round(row["cached_images_per_s"] / row["uncached_images_per_s"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), help=f"default: {' '.join(DEFAULT)}")
    parser.add_argument("--tiny", action="store_true", help="64 px, batch 4, 2 steps, small models (smoke)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16, help="batch size (paper 000: 16)")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per timed epoch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.batch, args.steps = 64, 4, 2
    setups = args.setups or (TINY if args.tiny else DEFAULT)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(accelerator=args.device, precision=args.precision, progress="none")
    fabric = make_fabric(config)
    results = [measure(name, fabric, args.size, args.batch, args.steps, args.rounds) for name in setups]
    print(
        json.dumps(
            {
                "benchmark": "training images/s, frozen prefix uncached vs cached",
                "device": str(fabric.device),
                "device_name": torch.cuda.get_device_name(fabric.device)
                if fabric.device.type == "cuda"
                else platform.processor(),
                "precision": resolve_precision(config),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "image_size": args.size,
                "batch": args.batch,
                "steps": args.steps,
                "results": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
