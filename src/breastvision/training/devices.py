"""Devices and precision for a run, through Lightning Fabric (one CPU, one GPU or DDP processes;
gloo on CPU; ``bf16-mixed`` or ``16-mixed`` on CUDA)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.fabric import Fabric

from breastvision.errors import BreastvisionError
from breastvision.training.config import TrainConfig


def resolve_precision(config: TrainConfig) -> str:
    """``auto``: bf16 autocast on CUDA when supported, fp16 with loss scaling otherwise; fp32 on CPU."""
    if config.precision != "auto":
        return config.precision
    cuda = config.accelerator in ("cuda", "gpu") or (
        config.accelerator == "auto" and torch.cuda.is_available()
    )
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def make_fabric(config: TrainConfig, run_dir: Path | None = None) -> Fabric:
    """A Fabric for the configured devices; TensorBoard logging under ``run_dir`` when installed."""
    loggers = []
    if run_dir is not None:
        try:
            from lightning.fabric.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(root_dir=run_dir, name="tensorboard", version=""))
        except ModuleNotFoundError:
            pass  # neither tensorboard nor tensorboardX installed: history.csv is the record
    try:
        return Fabric(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=config.strategy,
            precision=resolve_precision(config),  # type: ignore[arg-type]
            loggers=loggers,
        )
    except (ValueError, RuntimeError, TypeError) as err:
        raise BreastvisionError(
            f"cannot set up the devices ({config.accelerator}, {config.devices}): {err}"
        ) from None
