"""The training engine: one code path for one CPU, one GPU, or several processes, on Lightning Fabric.

Fabric owns the devices, process launching (DDP; gloo on CPU), mixed precision (``bf16-mixed`` or
``16-mixed`` on CUDA) and checkpoint I/O; the loop itself is a few plain functions in the spirit of
torchvision's ``references/classification`` (:func:`train_one_epoch`, :func:`evaluate`).

A run (:func:`train`):

1. reads the dataset and makes (or loads) the split; a split without a validation part gets one
   carved group-disjointly from training (``data.val_fraction``), recorded in the saved split file;
2. builds the model, freezes the stages before ``model.first_trainable_stage``
   (``freezing.freeze_before``), fits the stain normaliser on training images (if any) and
   normalises every image once into a disk cache;
3. expands each training image into its fixed views (``views``), and when a prefix is frozen and the
   views are fixed, computes the prefix's outputs once (``feature_cache``) so that each epoch runs
   only the trainable suffix;
4. trains, keeping the best-on-validation weights (``train.monitor``) and a resumable ``last.ckpt``
   (model, optimizer, scheduler, epoch, history, best);
5. evaluates the best weights on the test part and writes the run folder::

       model.safetensors   ModelBundle: weights, class names, pre-processing (stain normaliser
                           included), lineage (each part's starting weights, parent stages),
                           validation and test metrics
       history.csv         per-epoch train/val loss and accuracy, learning rate, seconds
       split.json          the split used;  config.yaml  the resolved config
       report.md, metrics.json, provenance.json, predictions.csv, plots/   (breastvision.evaluation)
       checkpoints/last.ckpt, checkpoints/best.ckpt;  tensorboard/  when TensorBoard is installed

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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from breastvision.data.records import PATIENT_GROUPINGS, Catalog
from breastvision.errors import BreastvisionError
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.training.checkpoint import check_resumable, read_checkpoint
from breastvision.training.config import ExperimentConfig, TrainConfig, resolve_weights, weights_root
from breastvision.training.feature_cache import FeatureCache
from breastvision.training.freezing import freeze_before
from breastvision.training.progress import progress_bar, wanted
from breastvision.training.views import Item, ViewDataset, ViewRenderer, derive_seed, training_views

log = logging.getLogger(__name__)


# -- devices ---------------------------------------------------------------------------------------


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


# -- data ------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """This process's share of ``n`` items: shuffled by (seed, epoch) or in order.

    With ``pad`` (training) every process gets the same number of items, as DDP needs the same
    number of steps everywhere; without (evaluation) nothing is duplicated.
    """

    def __init__(self, n: int, rank: int, world: int, seed: int, shuffle: bool, pad: bool):
        self.n, self.rank, self.world, self.seed = n, rank, world, seed
        self.shuffle, self.pad = shuffle, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "order", self.epoch))
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
    """Cached prefix outputs as ``(features, label, index)`` items."""

    def __init__(self, features: torch.Tensor, labels: Sequence[int]):
        self.features = features
        self.labels = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.features[index], self.labels[index], index


@dataclass
class RunData:
    catalog: Catalog
    class_names: list[str]
    split: Any
    train: list[Item]
    val: list[Item]
    test: list[Item]
    #: Per test target: (label, record path key shown in predictions.csv, group).
    test_targets: list[tuple[int, str, str]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _read(source: str, root: str | None, options: dict[str, Any]) -> Catalog:
    from breastvision.data.readers import read_dataset

    return read_dataset(source, root, **options)


def _make_split(config: ExperimentConfig, catalog: Catalog, external: Catalog | None) -> Any:
    from breastvision.data.splits import Split, make_split

    spec = config.data.split
    if spec.file:
        split = Split.load(spec.file)
        split.check(catalog)
        return split
    options = dict(spec.options)
    if external is not None:
        options["external"] = external
    try:
        return make_split(catalog, spec.protocol, spec.seed, **options)
    except TypeError as err:
        raise BreastvisionError(f"bad data.split.options {sorted(spec.options)}: {err}") from None


def _carve_validation(split: Any, catalog: Catalog, fraction: float, seed: int) -> Any:
    """A copy of ``split`` whose training part gives up a group-disjoint, class-stratified
    ``fraction`` to validation (the smallest number of stratified group folds ≥ 1/fraction, one fold
    taken), so model selection never looks at the test part."""
    from breastvision.data.splits import VIEW_SEPARATOR

    train = split.subset(catalog, "train")
    records = list({id(r): r for r in (t[0] if isinstance(t, tuple) else t for t in train)}.values())
    # Fewer folds (a larger share) when a class has fewer images than folds, as on tiny data sets.
    smallest_class = min(Counter(r.label for r in records).values())
    n_folds = min(round(1 / fraction), smallest_class, len({r.group for r in records}))
    if n_folds < 2:
        raise BreastvisionError(f"too few training images or groups to hold out {fraction:.0%} to validate")
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    _, val_idx = next(
        splitter.split(np.zeros(len(records)), [r.label for r in records], [r.group for r in records])
    )
    val_rels = {catalog.relpath(records[i]) for i in val_idx}
    assignment = dict(split.assignment)
    for key, part in split.assignment.items():
        if part == "train" and key.split(VIEW_SEPARATOR)[0] in val_rels:
            assignment[key] = "val"
    params = {
        **split.params,
        "val_carved_from_train": {"fraction": fraction, "seed": seed, "n_images": len(val_rels)},
    }
    return replace(split, assignment=assignment, params=params)


def _items(entries: list, catalog: Catalog, views: list[str] | None) -> list[Item]:
    """Items of a split part: each record under each of ``views`` (all sharing the record's target),
    or the split's own (record, view) pairs, each its own target."""
    items: list[Item] = []
    for target, entry in enumerate(entries):
        if isinstance(entry, tuple):
            record, view = entry
            items.append(Item(record, catalog.relpath(record), view, target))
        else:
            rel = catalog.relpath(entry)
            items += [Item(entry, rel, v, target) for v in views or ["identity"]]
    return items


def prepare_data(config: ExperimentConfig) -> RunData:
    """Catalog, split and the train / val / test items of a config (every process computes the same).

    Training items are each training image under each configured view, or the split's own
    (image, view) pairs for protocols that split after augmentation; validation and test items are
    the images themselves, or their 8 dihedral views with ``data.tta: dihedral8`` (image-level
    splits only: a view-level split already fixes which views are tested).
    """
    from breastvision.data.splits import VIEW_SEPARATOR

    data = config.data
    catalog = _read(data.source, data.root, data.options)
    external = _read(data.external_val, data.root, {}) if data.external_val else None
    split = _make_split(config, catalog, external)
    val_source = catalog
    if external is not None:
        val_source = external
    elif not split.subset(catalog, "val", data.fold):
        split = _carve_validation(split, catalog, data.val_fraction, config.data.split.seed)
    train_views = None if split.views else training_views(data.views)
    train = _items(split.subset(catalog, "train", data.fold), catalog, train_views)
    val = _items(split.subset(val_source, "val", data.fold), val_source, None)
    test_entries = split.subset(catalog, "test", data.fold)
    if data.tta == "dihedral8" and not split.views:
        from breastvision.data.transforms import DIHEDRAL_8

        test = _items(test_entries, catalog, list(DIHEDRAL_8))
    else:
        test = _items(test_entries, catalog, None)
    for part, items in (("train", train), ("val", val), ("test", test)):
        if not items:
            raise BreastvisionError(
                f"the split leaves no {part} images (protocol {split.protocol}, fold {data.fold})"
            )
    targets: dict[int, tuple[int, str, str]] = {}
    for item in test:
        key = f"{item.relpath}{VIEW_SEPARATOR}{item.view}" if split.views else item.relpath
        targets.setdefault(item.target, (item.record.label, key, item.record.group))
    facts = {
        "images": {
            "train": len({i.record.path for i in train}),
            "val": len({i.record.path for i in val}),
            "test": len({i.record.path for i in test}),
        },
        "views": {"train": len(train), "val": len(val), "test": len(test)},
        "test_predictions": len(targets),
        "skipped_files": len(catalog.skipped),
    }
    return RunData(
        catalog,
        list(catalog.class_names),
        split,
        train,
        val,
        test,
        [targets[t] for t in sorted(targets)],
        facts,
    )


# -- model -----------------------------------------------------------------------------------------


def _parent_bundle(spec: str | None) -> ModelBundle | None:
    """The model file ``spec`` names, when it is a breastvision model file (a previous stage)."""
    if spec is None or not spec.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(spec, framework="pt") as handle:
        is_bundle = "breastvision" in (handle.metadata() or {})
    return ModelBundle.load(spec) if is_bundle else None


def build_model(config: ExperimentConfig, num_classes: int) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The configured model with its starting weights, and the lineage it inherits.

    A previous stage's ``model.safetensors`` as ``model.pretrained`` continues its lineage (its
    classifier is re-initialised when the class count differs); other weights start one.
    """
    from breastvision.models.registry import create_model

    root = weights_root(config.weights_root)
    spec = config.model.pretrained
    if isinstance(spec, dict):
        pretrained: Any = {part: resolve_weights(v, root) for part, v in spec.items()}
    else:
        pretrained = resolve_weights(spec, root)
    model = create_model(
        config.model.name, num_classes=num_classes, pretrained=pretrained, **config.model.kwargs
    )
    parent = _parent_bundle(pretrained) if isinstance(pretrained, str) else None
    if parent is not None:
        lineage = [dict(entry) for entry in parent.lineage]
    else:
        lineage = [{"stage": "initial weights", "weights": dict(model.weights_origin)}]
    return model, lineage


def _preprocessing(config: ExperimentConfig, model: nn.Module, data: RunData) -> Preprocessing:
    from breastvision.models.registry import data_config

    expected = data_config(model)
    input_size = config.data.input_size or int(expected["input_size"][-1])
    return Preprocessing.parse(
        {
            "input_size": input_size,
            "resize": config.data.resize,
            "mean": tuple(config.data.mean or expected["mean"]),
            "std": tuple(config.data.std or expected["std"]),
            "mpp": _training_scale(config, data, config.data.resize or input_size),
        },
        f"config {config.name}: data",
    )


def _training_scale(config: ExperimentConfig, data: RunData, side: int) -> tuple[float, float] | None:
    """µm per pixel of the model input: ``data.mpp`` when the config states it, else, for BreakHis,
    the field of the training images' one magnification over the ``side`` it is resized to."""
    if config.data.mpp is not None:
        return (float(config.data.mpp[0]), float(config.data.mpp[1]))
    if not str(data.catalog.meta.get("format", "")).startswith("breakhis"):
        return None
    from breastvision.data.readers.breakhis import input_mpp

    return input_mpp([item.record for item in data.train], side)


def _fit_stain(config: ExperimentConfig, data: RunData, fabric: Fabric) -> tuple[dict[str, Any] | None, dict]:
    """Fit the stain normaliser on training images and normalise every used image once (first
    process; the others wait and read the cache). Returns its state and source → cached file."""
    stain = config.data.stain
    if stain is None:
        return None, {}
    from breastvision.data.stain import fit_normalizer
    from breastvision.data.stain_cache import NormalizedImageCache

    train_paths = sorted({i.record.path for i in data.train})
    reference = None if stain.reference == "auto" else stain.reference
    normalizer = fit_normalizer(stain.method, reference=reference, candidates=train_paths)
    cache = NormalizedImageCache(normalizer, stain.cache_dir, device=fabric.device)
    sources = sorted({i.record.path for i in (*data.train, *data.val, *data.test)})
    if fabric.is_global_zero:
        cache.ensure(sources)
    fabric.barrier()
    targets = cache.ensure(sources)
    data.facts["stain"] = {
        "method": stain.method,
        "reference": normalizer.state_dict().get("reference"),
        # Counted from the cache: with a warm cache this run normalised nothing itself.
        "fallback_tiles": len(cache.left_unnormalized(sources)),
    }
    return normalizer.state_dict(), dict(zip(sources, targets, strict=True))


# -- the loop --------------------------------------------------------------------------------------


def _make_optimizer(config: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise BreastvisionError("nothing to train: every parameter is frozen")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train_one_epoch(
    fabric: Fabric,
    model: nn.Module,
    prefix: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    description: str = "train",
    show_progress: bool = False,
) -> dict[str, float]:
    """One pass over ``loader``; mean loss and accuracy over every process's samples."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=fabric.device)  # loss sum, correct, count
    with progress_bar(fabric, len(loader), description, show_progress) as bar:
        for x, y, _ in loader:
            x, y = fabric.to_device((x, y))
            with fabric.autocast():
                with torch.no_grad():
                    x = prefix(x)
                logits = model(x)
                loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            n = y.numel()
            totals += torch.stack(
                [
                    loss.detach().double() * n,
                    (logits.argmax(1) == y).sum().double(),
                    torch.tensor(n, dtype=torch.float64, device=fabric.device),
                ]
            )
            bar.advance(loss=float(totals[0] / totals[2]), acc=float(totals[1] / totals[2]))
    totals = fabric.all_reduce(totals, reduce_op="sum")
    return {"loss": float(totals[0] / totals[2]), "acc": float(totals[1] / totals[2])}


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


def _loader(
    dataset: Dataset, fabric: Fabric, batch_size: int, seed: int, train: bool, num_workers: int
) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(
        len(dataset), fabric.global_rank, fabric.world_size, seed, shuffle=train, pad=train
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


def _probe_is_tensor(prefix: nn.Module, dataset: ViewDataset, fabric: Fabric) -> bool:
    """Whether the frozen prefix yields one tensor (cacheable); a fusion cut between its branches
    yields a pair holding the image itself, which is not worth caching."""
    x = fabric.to_device(dataset[0][0].unsqueeze(0))
    with torch.no_grad(), fabric.autocast():
        return isinstance(prefix.eval()(x), torch.Tensor)


def _use_cache(
    config: ExperimentConfig, prefix: nn.Module, renderer: ViewRenderer, probe: ViewDataset, fabric: Fabric
) -> bool:
    setting = config.train.cache_features
    if setting is False:
        return False
    reasons = []
    if isinstance(prefix, nn.Identity):
        reasons.append("no stage is frozen (set model.first_trainable_stage)")
    elif not renderer.fixed:
        reasons.append("views are re-drawn every epoch (data.views.fresh_each_epoch)")
    elif not _probe_is_tensor(prefix, probe, fabric):
        reasons.append(f"the prefix before '{config.model.first_trainable_stage}' does not output one tensor")
    if reasons and setting is True:
        raise BreastvisionError(f"train.cache_features is true but {reasons[0]}")
    return not reasons


def _cache_features(
    config: ExperimentConfig,
    fabric: Fabric,
    model: nn.Module,
    prefix: nn.Module,
    renderer: ViewRenderer,
    datasets: dict[str, Dataset],
    batch_size: int,
    show: bool,
) -> dict[str, Any]:
    """Replace each part's image-view dataset by the frozen prefix's outputs; return the cache facts."""
    context = {
        **renderer.context(),
        "precision": resolve_precision(config.train),
        "architecture": getattr(model, "architecture", type(model).__name__),
        "first_trainable_stage": config.model.first_trainable_stage,
    }
    # ONNX Runtime computes float32 CPU prefixes (see feature_cache); autocast ones stay eager.
    backend = config.train.cache_backend if context["precision"] == "32-true" else "eager"
    cache = FeatureCache(prefix, _feature_cache_dir(config.train.cache_dir), context, show, backend)
    hits = computed = 0
    for part, dataset in list(datasets.items()):
        items = dataset.items
        paths, views = [i.record.path for i in items], [i.view for i in items]
        workers = config.data.num_workers
        features = cache.features(dataset, paths, views, fabric, batch_size, workers, f"{part} features")
        datasets[part] = FeatureDataset(features, [i.record.label for i in items])
        hits, computed = hits + cache.hits, computed + cache.computed
    shape = list(datasets["train"].features.shape[1:])
    return {
        "used": True, "entries_reused": hits, "entries_computed": computed, "feature_shape": shape,
        "backend": cache.backend, "backend_note": cache.backend_note, "onnx_max_abs_diff": cache.max_abs_diff,
    }


def _feature_cache_dir(setting: str | None) -> Path | None:
    if setting is None:
        return None
    if setting == "auto":
        from breastvision.paths import cache_dir

        return cache_dir() / "features"
    return Path(setting).expanduser()


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _score(monitor: str, val_loss: float, val_acc: float) -> list[float]:
    """Higher is better; ties on the monitored value go to the other one."""
    return [val_acc, -val_loss] if monitor == "val_acc" else [-val_loss, val_acc]


def _run(
    fabric: Fabric, config: ExperimentConfig, run_dir: Path, resume: Path | None,
    checkpoint: dict[str, Any] | None,
) -> Path:
    started = time.perf_counter()
    tc = config.train
    seed_everything(tc.seed % 2**32, verbose=False)
    show = fabric.is_global_zero and wanted(tc.progress)
    say = log.info if fabric.is_global_zero else log.debug

    data = prepare_data(config)
    num_classes = len(data.class_names)
    model, lineage = build_model(config, num_classes)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    prefix, suffix = freeze_before(model, config.model.first_trainable_stage)
    model.to(fabric.device)
    preprocessing = _preprocessing(config, model, data)
    preprocessing.stain, normalized = _fit_stain(config, data, fabric)
    renderer = ViewRenderer(config.data.views, preprocessing, normalized)
    datasets = {part: ViewDataset(getattr(data, part), renderer) for part in ("train", "val", "test")}

    eval_batch = tc.eval_batch_size or tc.batch_size
    step_prefix: nn.Module = prefix
    cache_facts: dict[str, Any] = {"used": False}
    if _use_cache(config, prefix, renderer, datasets["train"], fabric):
        cache_facts = _cache_features(config, fabric, model, prefix, renderer, datasets, eval_batch, show)
        step_prefix = nn.Identity()  # the datasets now hold the prefix's outputs
        say(
            f"feature cache: {cache_facts['entries_computed']} views computed"
            f"{' by ' + cache_facts['backend'] if cache_facts['backend'] else ''}, "
            f"{cache_facts['entries_reused']} reused (shape {cache_facts['feature_shape']})"
        )

    optimizer = _make_optimizer(tc, [p for p in suffix.parameters() if p.requires_grad])
    scheduler = _make_scheduler(tc, optimizer)
    trainable, optimizer = fabric.setup(suffix, optimizer)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    workers = 0 if cache_facts["used"] else config.data.num_workers
    train_loader, train_sampler = _loader(datasets["train"], fabric, tc.batch_size, tc.seed, True, workers)
    val_loader, _ = _loader(datasets["val"], fabric, eval_batch, tc.seed, False, workers)
    val_labels = torch.tensor([i.record.label for i in data.val])

    start_epoch, history, best = 0, [], None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, history, best = checkpoint["epoch"], checkpoint["history"], checkpoint["best"]
        say(f"resuming {resume} after epoch {start_epoch}")
    ckpt_dir = run_dir / "checkpoints"
    for epoch in range(start_epoch, tc.epochs):
        seed_everything(derive_seed(tc.seed, "epoch", epoch, fabric.global_rank) % 2**32, verbose=False)
        train_sampler.set_epoch(epoch)
        if isinstance(datasets["train"], ViewDataset):
            datasets["train"].set_epoch(epoch)
        t0 = time.perf_counter()
        fit = train_one_epoch(
            fabric,
            trainable,
            step_prefix,
            train_loader,
            optimizer,
            loss_fn,
            f"epoch {epoch + 1}/{tc.epochs}",
            show,
        )
        val_logits = evaluate(fabric, trainable, step_prefix, val_loader, len(val_labels), num_classes)
        val_loss = float(nn.functional.cross_entropy(val_logits, val_labels))
        val_acc = float((val_logits.argmax(1) == val_labels).float().mean())
        row = {
            "epoch": epoch + 1,
            "train_loss": fit["loss"],
            "train_acc": fit["acc"],
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        scheduler.step()
        history.append(row)
        score = _score(tc.monitor, val_loss, val_acc)
        if best is None or score > best["score"]:
            best = {"epoch": epoch + 1, "score": score, "val_loss": val_loss, "val_acc": val_acc}
            fabric.save(ckpt_dir / "best.ckpt", {"model": model, "epoch": epoch + 1})
        fabric.save(
            ckpt_dir / "last.ckpt",
            {
                "model": model,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "epoch": epoch + 1,
                "history": history,
                "best": best,
                "config": config.to_dict(),
            },
        )
        fabric.log_dict(row, step=epoch + 1)
        if fabric.is_global_zero:
            _write_history(run_dir / "history.csv", history)
        say(
            f"epoch {epoch + 1}/{tc.epochs}: train loss {fit['loss']:.4f} acc {fit['acc']:.3f} | "
            f"val loss {val_loss:.4f} acc {val_acc:.3f}{' *' if best['epoch'] == epoch + 1 else ''}"
        )

    model.load_state_dict(read_checkpoint(ckpt_dir / "best.ckpt")["model"])
    test_loader, _ = _loader(datasets["test"], fabric, eval_batch, tc.seed, False, workers)
    test_logits = evaluate(fabric, trainable, step_prefix, test_loader, len(data.test), num_classes)
    probs = _average_per_target(torch.softmax(test_logits, 1), [i.target for i in data.test])
    facts = {
        **data.facts,
        "feature_cache": cache_facts,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in suffix.parameters() if p.requires_grad),
        "device": str(fabric.device),
        "processes": fabric.world_size,
        "precision": resolve_precision(tc),
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "seconds_to_best_epoch": sum(r["seconds"] for r in history[: best["epoch"]]),
        "wall_clock_seconds_this_session": time.perf_counter() - started,
        "test_time_augmentation": config.data.tta,
    }
    if fabric.is_global_zero:
        _write_outputs(run_dir, config, data, model, preprocessing, lineage, best, probs, facts)
        say(f"run folder: {run_dir}")
    fabric.barrier()
    return run_dir


def _average_per_target(probs: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Mean probability over the views that share a target (test-time augmentation)."""
    index = torch.tensor(targets)
    n = int(index.max()) + 1
    sums = torch.zeros(n, probs.shape[1], dtype=torch.float64).index_add_(0, index, probs.double())
    counts = torch.bincount(index, minlength=n).double().unsqueeze(1)
    return (sums / counts).numpy()


def _write_outputs(
    run_dir: Path,
    config: ExperimentConfig,
    data: RunData,
    model: nn.Module,
    preprocessing: Preprocessing,
    lineage: list[dict[str, Any]],
    best: dict[str, Any],
    probs: np.ndarray,
    facts: dict[str, Any],
) -> None:
    import json

    from breastvision.evaluation.report import (
        HEADLINE,
        evaluate_predictions,
        lookup,
        write_predictions_csv,
        write_report,
    )
    from breastvision.models.staging import stages

    split_path = data.split.save(run_dir / "split.json")
    y = np.array([t[0] for t in data.test_targets])
    keys = [t[1] for t in data.test_targets]
    groups = [t[2] for t in data.test_targets] if data.catalog.grouping in PATIENT_GROUPINGS else None
    metrics = evaluate_predictions(y, probs, data.class_names, groups, seed=config.train.seed)
    write_predictions_csv(
        run_dir / "predictions.csv", keys, y, probs, data.class_names, [t[2] for t in data.test_targets]
    )
    names = stages(model)
    first = config.model.first_trainable_stage
    frozen = names[: names.index(first)] if first else []
    stage = {
        "stage": config.stage or config.name,
        "weights": dict(model.weights_origin),  # each part: file and SHA-256, or random init
        "data": f"{data.catalog.name} ({config.data.source})",
        "split": {
            "protocol": data.split.protocol,
            "leaky": data.split.leaky,
            "fold": config.data.fold,
            "file": str(split_path),
        },
        "frozen_stages": frozen,
        "trainable_stages": [n for n in names if n not in frozen],
        "epochs": facts["epochs_run"],
        "best_epoch": best["epoch"],
        "checkpoint": str(run_dir / "model.safetensors"),
    }
    lineage = [*lineage, stage]
    headline = {k: lookup(metrics, k) for k in HEADLINE if lookup(metrics, k) is not None}
    bundle = ModelBundle(
        architecture=model.architecture,
        class_names=data.class_names,
        state_dict=model.state_dict(),
        model_kwargs=dict(model.model_kwargs),
        preprocessing=preprocessing,
        lineage=json.loads(json.dumps(lineage, default=str)),
        metrics=json.loads(
            json.dumps(
                {
                    "val": {"epoch": best["epoch"], "loss": best["val_loss"], "accuracy": best["val_acc"]},
                    "test": headline,
                },
                default=float,
            )
        ),
        extra={"weights_origin": model.weights_origin, "config_name": config.name},
    )
    bundle.save(run_dir / "model.safetensors")
    facts["model_file_mb"] = round((run_dir / "model.safetensors").stat().st_size / 2**20, 2)
    write_report(
        run_dir,
        metrics=metrics,
        config=config.to_dict(),
        split_info=split_path,
        weights_origin=model.weights_origin,
        lineage=lineage,
        history=run_dir / "history.csv",
        class_names=data.class_names,
        y_true=y,
        probs=probs,
        facts=facts,
        title=f"{config.name}: {stage['stage']} ({model.architecture})",
    )


def run_dir_for(config: ExperimentConfig, resume: str | Path | None, out: str | Path | None) -> Path:
    """``out``, else the run folder a ``checkpoints/last.ckpt`` sits in, else the config's."""
    if out:
        return Path(out).expanduser()
    if resume and Path(resume).parent.name == "checkpoints":
        return Path(resume).parent.parent
    return config.run_dir


def train(config: ExperimentConfig, resume: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Train (or ``resume``) one run of ``config``; return its run folder (module docstring)."""
    run_dir = run_dir_for(config, resume, out)
    checkpoint = None
    if resume is not None:  # read and checked before any data is: a bad one fails at once
        checkpoint = read_checkpoint(resume)
        check_resumable(checkpoint, config, resume)
    last = run_dir / "checkpoints" / "last.ckpt"
    if resume is None and last.exists():
        raise BreastvisionError(f"{run_dir} holds a run already; continue it (--resume {last}) or use --out")
    fabric = make_fabric(config.train, run_dir)
    threads = torch.get_num_threads()
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    try:
        return fabric.launch(_run, config, run_dir, Path(resume) if resume else None, checkpoint)
    finally:
        torch.set_num_threads(threads)  # callers looping over runs keep their own setting
