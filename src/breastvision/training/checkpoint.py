"""A run's checkpoints: ``checkpoints/last.ckpt`` to resume, ``best.ckpt`` (the model at its
best-on-validation epoch) at the end; written after every epoch (:func:`save_last`,
:func:`save_best`), read back here.

``last.ckpt`` holds everything a run needs to continue (model, optimizer, scheduler, epoch,
history, best score, config, and the weights' moving average under ``train.ema_decay``);
``best.ckpt`` only the best epoch's model and that epoch, which is
all the final evaluation needs. Both are read with ``weights_only=True`` pinned
(``models.weights.load_torch_file``), so a checkpoint from elsewhere cannot run code whatever the
installed torch's default, and anything else given to ``--resume`` is named for what it is. A
checkpoint resumes only under the config it was started with, by the one rule of
``run_record.config_differences``; ``train`` settings (more epochs, another schedule) may change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.fabric import Fabric
from torch import nn

from breastvision.errors import BreastvisionError
from breastvision.models.weights import load_torch_file
from breastvision.training.config import ExperimentConfig
from breastvision.training.run_record import config_differences

if TYPE_CHECKING:  # loop imports this module
    from breastvision.training.loop import Loop

#: What ``last.ckpt`` holds besides the model: resuming needs every one of them.
RESUME_KEYS = ("optimizer", "scheduler", "epoch", "history", "best", "config")
#: What ``best.ckpt`` holds.
BEST_KEYS = ("model", "epoch")
#: The type of each part of ``last.ckpt`` (Fabric saves modules and optimizers as state dicts).
_KINDS = {"model": dict, "optimizer": dict, "scheduler": dict, "epoch": int, "history": list,
          "best": (dict, type(None)), "config": dict}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A training checkpoint as a dict; a one-line error for a missing, bad or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise BreastvisionError(f"checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        raise BreastvisionError(
            f"{path} is a model file, not a training checkpoint; resume from its run's checkpoints/last.ckpt"
        )
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise BreastvisionError(f"{path} is not a breastvision training checkpoint (no model state)")
    return checkpoint


def check_resumable(checkpoint: dict[str, Any], config: ExperimentConfig, path: str | Path) -> None:
    """Refuse a checkpoint that cannot continue a run of ``config``, saying why."""
    path = Path(path)
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing and set(checkpoint) == set(BEST_KEYS):
        raise BreastvisionError(
            f"{path} is a best-epoch checkpoint (model weights of epoch {checkpoint['epoch']} only, no "
            f"optimizer or history); resume from {path.with_name('last.ckpt')}"
        )
    if missing:
        raise BreastvisionError(
            f"{path} is not a resumable breastvision checkpoint (it lacks {', '.join(missing)}); "
            "resume from a run's checkpoints/last.ckpt"
        )
    wrong = [key for key, kind in _KINDS.items() if not isinstance(checkpoint[key], kind)]
    if wrong:
        raise BreastvisionError(
            f"{path} is not a breastvision checkpoint ({', '.join(wrong)} of the wrong type)"
        )
    changed = config_differences(checkpoint["config"], config, may_differ=("train",))
    if changed:
        sections = sorted({c.split(":")[0].split(".")[0] for c in changed})
        raise BreastvisionError(
            f"{path} was trained with different {' and '.join(sections)} settings "
            f"({'; '.join(changed[:3])}); resume with the config it was started with (only train "
            "settings such as epochs may change)"
        )


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch, and what ``last.ckpt`` restores."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    #: The best epoch so far: ``epoch``, ``score`` (higher is better), ``val_loss``, ``val_acc``.
    best: dict[str, Any] | None = None


def restore(checkpoint: dict[str, Any], optimizer: Any, scheduler: Any, ema: Any = None) -> LoopState:
    """Optimizer, scheduler and moving-average state from a checkpoint :func:`check_resumable`
    accepted; the loop's. An average switched on at resume starts from the resumed weights."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if ema is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])
    return LoopState(checkpoint["epoch"], checkpoint["history"], checkpoint["best"])


def save_best(fabric: Fabric, folder: Path, model: nn.Module, state: LoopState) -> None:
    """``best.ckpt``: written when an epoch improved on the best."""
    fabric.save(folder / "best.ckpt", {"model": model, "epoch": state.epoch})


def save_last(fabric: Fabric, folder: Path, loop: Loop, state: LoopState, config: ExperimentConfig) -> None:
    """``last.ckpt`` after every epoch, with the weights' moving average under ``ema`` when the run
    keeps one."""
    content = {
        "model": loop.model, "optimizer": loop.optimizer, "scheduler": loop.scheduler, "epoch": state.epoch,
        "history": state.history, "best": state.best, "config": config.to_dict(),
    }
    if loop.ema is not None:
        content["ema"] = loop.ema.state_dict()
    fabric.save(folder / "last.ckpt", content)


def load_best(folder: Path, model: nn.Module) -> None:
    model.load_state_dict(read_checkpoint(folder / "best.ckpt")["model"])
