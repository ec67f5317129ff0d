"""The ``--device auto|cpu|cuda[:N]`` option of every command that runs a model (predict,
predict-slide, evaluate, serve, export), resolved in one place so that each says the same thing when
the device is absent. Training has its own (``training.devices``: Lightning Fabric's accelerators).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from breastvision.errors import BreastvisionError

if TYPE_CHECKING:  # building the CLI parser must not import torch
    import torch

DEVICE_HELP = "auto (a GPU when there is one), cpu, cuda or cuda:N (default: auto)"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU when torch sees one, else the CPU; a named device that this
    machine lacks is a one-line ``BreastvisionError``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BreastvisionError(f"unknown --device {name!r} (choose auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise BreastvisionError(f"--device {name!r} is not supported (choose auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BreastvisionError(f"--device {name}: no CUDA GPU is available to this torch "
                                f"({torch.__version__}); use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BreastvisionError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device
