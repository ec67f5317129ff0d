"""The training loop, in the spirit of torchvision's ``references/classification``: a sampler,
:func:`train_one_epoch`, :func:`evaluate` and :func:`fit` (epochs, model selection, checkpoints).

Randomness: the generators are re-seeded from (seed, epoch, rank) at the start of every epoch and
the batch order is a function of (seed, epoch), so a resumed run continues exactly as an
uninterrupted one, and cached and uncached training see the same batches and dropout masks.

Evaluation in several processes shards the items without padding (process ``r`` takes items
``r, r + w, …``), gathers logits with their item indices and checks every item came back exactly
once — unlike ``DistributedSampler``, which pads with duplicates.
"""

from __future__ import annotations

import csv
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything
from sklearn.metrics import balanced_accuracy_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from breastvision.errors import BreastvisionError
from breastvision.training.balance import sample_weights
from breastvision.training.checkpoint import LoopState, save_best, save_last
from breastvision.training.config import ExperimentConfig, TrainConfig
from breastvision.training.progress import progress_bar
from breastvision.training.segmentation import mask_loss
from breastvision.training.views import ViewDataset, derive_seed

log = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """This process's share of ``n`` items: shuffled by (seed, epoch) or in order; with ``weights``
    (per item), ``n`` draws with replacement in proportion to them (``balance.sample_weights``),
    also a function of (seed, epoch).

    With ``pad`` (training) every process gets the same number of items, as DDP needs the same
    number of steps everywhere; without (evaluation) nothing is duplicated.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool, pad: bool,
                 weights: torch.Tensor | None = None):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.shuffle, self.pad, self.weights = shuffle, pad, weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
        if self.weights is not None:
            order = list(WeightedRandomSampler(self.weights, self.n, replacement=True, generator=g))
        elif self.shuffle:
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.pad and order and len(order) % self.world:
            order += order[: self.world - len(order) % self.world]
        return order[self.rank :: self.world]

    def __iter__(self):
        return iter(self._order())

    def __len__(self) -> int:
        total = math.ceil(self.n / self.world) * self.world if self.pad else self.n
        return len(range(self.rank, total, self.world))


class FeatureDataset(Dataset):
    """Cached prefix outputs as ``(features, label, index)`` items. ``features`` is one tensor, or a
    tuple of tensors (a fusion cut inside its branches), whose items are then tuples of parts."""

    def __init__(self, features: torch.Tensor | tuple[torch.Tensor, ...], labels: Sequence[int]):
        self.features = features
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        if isinstance(self.features, tuple):
            return tuple(part[index] for part in self.features), self.labels[index], index
        return self.features[index], self.labels[index], index

    @property
    def item_shape(self) -> list[int] | list[list[int]]:
        """One item's shape, or one shape per part."""
        if isinstance(self.features, tuple):
            return [list(part.shape[1:]) for part in self.features]
        return list(self.features.shape[1:])


def make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise BreastvisionError("nothing to train: every parameter is frozen")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def make_ema(suffix: nn.Module, decay: float) -> AveragedModel | None:
    """The exponential moving average of the trainable suffix (``train.ema_decay``), buffers too, so
    BatchNorm statistics match the averaged weights; ``None`` when off. Its first update copies."""
    if not decay:
        return None
    return AveragedModel(suffix, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def make_loader(
    dataset: Dataset, fabric: Fabric, batch_size: int, seed: int, train: bool, num_workers: int,
    weights: torch.Tensor | None = None,
) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(
        len(dataset), fabric.global_rank, fabric.world_size, seed, shuffle=train, pad=train, weights=weights
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        # A last training batch of one image breaks BatchNorm; the order changes every epoch, so
        # every image is still seen (timm's choice too). Evaluation keeps every item.
        drop_last=train and len(sampler) >= batch_size,
        num_workers=num_workers,
        pin_memory=fabric.device.type == "cuda",
    )
    # Not ``fabric.setup_dataloaders``: its loader calls ``sampler.set_epoch`` with its own count of
    # iterations, which restarts at 0 in a resumed run; batches are moved to the device in the loops.
    return loader, sampler


@dataclass
class Mixup:
    """One batch's mixup draw: ``λ`` and the partner of each item (``partner[i]`` is blended into ``i``)."""

    lam: float
    partner: torch.Tensor

    @classmethod
    def draw(cls, alpha: float, n: int, device: torch.device) -> Mixup | None:
        """``None`` when off (``alpha`` 0); else from the global generators, which ``fit`` seeds by
        (seed, epoch, rank), so a resumed run draws as an uninterrupted one."""
        if not alpha:
            return None
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        return cls(lam, torch.randperm(n).to(device))

    def blend(self, x: Any) -> Any:
        """``λ·x + (1 − λ)·x[partner]``, part by part for a tuple of prefix outputs."""
        if isinstance(x, tuple):
            return tuple(self.blend(part) for part in x)
        return self.lam * x + (1 - self.lam) * x[self.partner]

    def loss(self, loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lam * loss_fn(logits, y) + (1 - self.lam) * loss_fn(logits, y[self.partner])


def _losses(
    model: nn.Module, x: Any, y: torch.Tensor, masks: torch.Tensor | None, loss_fn: nn.Module,
    mask_weight: float, mixup: Mixup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(training loss, logits, mask loss)``: ``loss_fn`` on the logits, plus ``mask_weight`` times
    the auxiliary head's mask loss (``training.segmentation``) when it is > 0 (else the mask loss is 0);
    with ``mixup``, on the blended batch against both items' labels and masks."""
    if mixup is not None:
        x = mixup.blend(x)
        masks = None if masks is None else mixup.blend(masks.float())
    if mask_weight:
        logits, mask_logits = model.forward_with_mask(x)
        seg = mask_loss(mask_logits, masks)
    else:
        logits, seg = model(x), torch.zeros((), device=y.device)
    classification = mixup.loss(loss_fn, logits, y) if mixup else loss_fn(logits, y)
    return classification + mask_weight * seg, logits, seg


def train_one_epoch(
    fabric: Fabric,
    model: nn.Module,
    prefix: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    description: str = "train",
    show_progress: bool = False,
    mask_weight: float = 0.0,
    mixup_alpha: float = 0.0,
    ema: AveragedModel | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; mean loss and accuracy over every process's samples, and with a
    ``mask_weight`` (batches ``(x, y, index, mask)``) the mean mask loss too. With ``mixup_alpha``
    (:class:`Mixup`) the accuracy counts an item right when the arg-max is its own label; ``ema``
    (:func:`make_ema`) is updated after every step."""
    model.train()
    # loss sum, correct, count, mask-loss sum
    totals = torch.zeros(4, dtype=torch.float64, device=fabric.device)
    with progress_bar(fabric, len(loader), description, show_progress) as bar:
        for batch in loader:
            x, y = fabric.to_device((batch[0], batch[1]))
            masks = fabric.to_device(batch[3]) if mask_weight else None
            with fabric.autocast():
                with torch.no_grad():
                    x = prefix(x)
                mixup = Mixup.draw(mixup_alpha, y.numel(), y.device)
                loss, logits, seg = _losses(model, x, y, masks, loss_fn, mask_weight, mixup)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            n = y.numel()
            totals += torch.stack(
                [
                    loss.detach().double() * n,
                    (logits.argmax(1) == y).sum().double(),
                    torch.tensor(n, dtype=torch.float64, device=fabric.device),
                    seg.detach().double() * n,
                ]
            )
            bar.advance(loss=float(totals[0] / totals[2]), acc=float(totals[1] / totals[2]))
    totals = fabric.all_reduce(totals, reduce_op="sum")
    out = {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2])}
    if mask_weight:
        out["mask_loss"] = float(totals[3] / totals[2])
    return out


@torch.no_grad()
def evaluate(
    fabric: Fabric, model: nn.Module, prefix: nn.Module, loader: DataLoader, n_items: int, num_classes: int
) -> torch.Tensor:
    """Float32 logits of all ``n_items`` items in item order, gathered from every process.

    Each process's loader must hold items ``rank, rank + world, …`` (``EpochSampler`` without
    padding); the gathered indices are checked to cover every item exactly once.
    """
    model.eval()
    shard = math.ceil(n_items / fabric.world_size)
    logits = torch.zeros(shard, num_classes, device=fabric.device)
    index = torch.full((shard,), -1, dtype=torch.long, device=fabric.device)
    filled = 0
    for x, _, idx in loader:
        with fabric.autocast():
            out = model(prefix(fabric.to_device(x))).float()
        logits[filled : filled + len(out)] = out
        index[filled : filled + len(out)] = idx
        filled += len(out)
    if fabric.world_size > 1:
        # Equal-sized shards for all_gather; the padding rows carry index -1 and are dropped.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*all_gather is deprecated")  # Lightning's own call
            logits = fabric.all_gather(logits).reshape(-1, num_classes)
            index = fabric.all_gather(index).reshape(-1)
    keep = index >= 0
    logits, index = logits[keep], index[keep]
    order = torch.argsort(index)
    if not torch.equal(index[order].cpu(), torch.arange(n_items)):
        raise RuntimeError(f"evaluation gathered {len(index)} predictions for {n_items} items, not each once")
    return logits[order].cpu()


def score(monitor: str, row: dict[str, Any]) -> list[float]:
    """Higher is better; ties on the monitored value go to the validation loss (accuracy for it)."""
    if monitor == "val_loss":
        return [-row["val_loss"], row["val_acc"]]
    return [row[monitor], -row["val_loss"]]


@dataclass
class Loop:
    """Everything an epoch touches. ``trainable`` is the Fabric-wrapped trainable suffix and
    ``prefix`` the frozen part still to run (``nn.Identity`` when its outputs are cached); ``model``
    is the whole model, which the checkpoints hold."""

    fabric: Fabric
    model: nn.Module
    trainable: nn.Module
    prefix: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    num_classes: int
    show: bool
    #: The training loss on the logits (``balance.classification_loss``), on the device.
    loss_fn: nn.Module
    #: The moving average of ``trainable`` (:func:`make_ema`), or ``None``.
    ema: AveragedModel | None = None

    @property
    def evaluated(self) -> nn.Module:
        """What the epochs validate: the moving average when there is one."""
        return self.trainable if self.ema is None else self.ema.module


@contextmanager
def averaged_weights(loop: Loop) -> Iterator[None]:
    """Within the block ``loop.model`` holds the moving average's weights (a no-op without one), so
    what is saved as the best epoch is what was validated; the trained weights come back after."""
    if loop.ema is None:
        yield
        return
    suffix = loop.trainable.module
    trained = {k: v.clone() for k, v in suffix.state_dict().items()}
    suffix.load_state_dict(loop.ema.module.state_dict())
    try:
        yield
    finally:
        suffix.load_state_dict(trained)


def _epoch(loop: Loop, train_loader: DataLoader, val_loader: DataLoader, val_labels: torch.Tensor,
           epoch: int, tc: TrainConfig) -> dict[str, Any]:
    """Train one epoch and validate; returns the row history.csv gets."""
    t0 = time.perf_counter()
    fit = train_one_epoch(loop.fabric, loop.trainable, loop.prefix, train_loader, loop.optimizer,
                          loop.loss_fn, f"epoch {epoch + 1}/{tc.epochs}", loop.show, tc.mask_loss_weight,
                          tc.mixup_alpha, loop.ema)
    val_logits = evaluate(loop.fabric, loop.evaluated, loop.prefix, val_loader, len(val_labels),
                          loop.num_classes)
    val_loss = float(nn.functional.cross_entropy(val_logits, val_labels))
    val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
    # Macro recall over the classes present: what class balancing is for, and what chooses it.
    val_recall = float(balanced_accuracy_score(val_labels.numpy(), val_logits.argmax(1).numpy()))
    masks = {"train_mask_loss": fit["mask_loss"]} if "mask_loss" in fit else {}
    return {"epoch": epoch + 1, "train_loss": fit["loss"], "train_acc": fit["acc"], **masks,
            "val_loss": val_loss, "val_acc": val_acc, "val_recall_macro": val_recall,
            "lr": loop.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def fit(
    loop: Loop, config: ExperimentConfig, datasets: dict[str, Dataset], workers: int,
    state: LoopState, run_dir: Path, say: Callable[[str], None],
) -> LoopState:
    """Train from ``state.epoch`` to ``train.epochs``, keeping the best-on-validation weights
    (``train.monitor``) and a resumable checkpoint after every epoch; returns the final state."""
    tc, fabric = config.train, loop.fabric
    eval_batch = tc.eval_batch_size or tc.batch_size
    weights = sample_weights(datasets["train"].labels) if tc.sampler == "balanced" else None
    train_loader, sampler = make_loader(datasets["train"], fabric, tc.batch_size, tc.seed, True, workers,
                                        weights)
    val_loader, _ = make_loader(datasets["val"], fabric, eval_batch, tc.seed, False, workers)
    val_labels = torch.tensor(datasets["val"].labels)
    for epoch in range(state.epoch, tc.epochs):
        seed_everything(derive_seed(tc.seed, "epoch", epoch, fabric.global_rank) % 2**32, verbose=False)
        sampler.set_epoch(epoch)
        if isinstance(datasets["train"], ViewDataset):
            datasets["train"].set_epoch(epoch)
        row = _epoch(loop, train_loader, val_loader, val_labels, epoch, tc)
        loop.scheduler.step()
        state.epoch = epoch + 1
        state.history.append(row)
        value = score(tc.monitor, row)
        improved = state.best is None or value > state.best["score"]
        if improved:
            state.best = {"epoch": epoch + 1, "score": value, "val_loss": row["val_loss"],
                          "val_acc": row["val_acc"]}
            with averaged_weights(loop):
                save_best(fabric, run_dir / "checkpoints", loop.model, state)
        save_last(fabric, run_dir / "checkpoints", loop, state, config)
        fabric.log_dict(row, step=epoch + 1)
        if fabric.is_global_zero:
            write_history(run_dir / "history.csv", state.history)
        say(f"epoch {epoch + 1}/{tc.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f}{' *' if improved else ''}")
    return state
