"""The training engine: one code path for one CPU, one GPU, or several processes, on Lightning Fabric.

A run (:func:`train`) is a few steps, each in its own module:

1. ``data_setup.prepare_data``: the dataset, the split (a split without a validation part gets one
   carved group-disjointly from training, ``data.val_fraction``, recorded in the saved split file)
   and the train / val / test items;
2. here: the model with its starting weights and lineage (:func:`build_model`), frozen before
   ``model.first_trainable_stage`` (``freezing.freeze_before``); the stain normaliser fitted on
   training images, every image normalised once into a disk cache (:func:`fit_stain`); each
   training image expanded into its fixed views (``views``), and when a prefix is frozen and the
   views are fixed, the prefix's outputs computed once (``feature_cache``) so that each epoch runs
   only the trainable suffix (:func:`prepare_inputs`);
3. ``loop.fit``: the epochs, keeping the best-on-validation weights (``train.monitor``) and a
   resumable ``last.ckpt`` (``checkpoint``);
4. ``calibrate``: a temperature fitted on the best weights' validation logits and malignant-vs-rest
   operating points chosen on the calibrated validation probabilities; ``scope.fit_scope``: the
   out-of-scope detector fitted on the training images' features (``models.scope``);
5. ``outputs.write_outputs``: the model file, the test part scored by the one predictor
   (``serving.predict``, as ``predict`` and ``evaluate`` score it: one forward pass of the whole
   model over the test images, with ``data.tta``), and the run folder, returned as a
   ``run_record.RunRecord``; test metrics are on calibrated probabilities. The epochs' feature cache
   covers the training and validation parts (and the test part of mask-guided runs, whose mask head's
   Dice is measured on it).

**Test-time augmentation on validation.** With ``data.tta`` the validation predictions
(``val_predictions.csv``) and the temperature and operating points are those of the mean over the
set's views, as the test part's and every later ``--tta`` prediction are, so whether TTA helps is
chosen on validation alone. The other views of each validation image are one more part of the
inputs (``val_views``: ``data_setup.RunData.val_views``), rendered by the same ``ViewRenderer`` and,
with the feature cache, cached per image view like every other part (``feature_cache`` keys entries
by view), so cached and uncached runs still agree; they are scored once, with the best weights
(:func:`_validation_logits`). The epochs themselves validate on the images as given: model
selection and ``history.csv`` do not depend on ``data.tta``, and no epoch pays for the views.

Devices, process launching (DDP; gloo on CPU) and mixed precision are Fabric's (``devices``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.seed import seed_everything
from torch import nn
from torch.utils.data import Dataset

from breastvision.errors import BreastvisionError
from breastvision.evaluation.calibration import calibrated_probabilities
from breastvision.models.bundle import ModelBundle, Preprocessing
from breastvision.training.balance import classification_loss
from breastvision.training.calibrate import calibrate
from breastvision.training.checkpoint import LoopState, check_resumable, load_best, read_checkpoint, restore
from breastvision.training.config import ExperimentConfig, resolve_weights, weights_root
from breastvision.training.data_setup import RunData, prepare_data
from breastvision.training.devices import make_fabric, resolve_precision
from breastvision.training.feature_cache import FeatureCache
from breastvision.training.freezing import freeze_before
from breastvision.training.loop import (
    FeatureDataset,
    Loop,
    evaluate,
    fit,
    make_ema,
    make_loader,
    make_optimizer,
    make_scheduler,
)
from breastvision.training.outputs import Trained, write_outputs
from breastvision.training.progress import progress_bar, wanted
from breastvision.training.run_record import RunFacts, RunRecord
from breastvision.training.scope import fit_scope
from breastvision.training.segmentation import mask_dice, prepare_mask_head, render_masks, with_training_masks
from breastvision.training.views import ViewDataset, ViewRenderer

log = logging.getLogger(__name__)


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

    root = weights_root(config.weights_root, config.data.root)
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


def fit_stain(
    config: ExperimentConfig, data: RunData, fabric: Fabric, show: bool = False
) -> tuple[dict[str, Any] | None, dict, dict[str, Any] | None]:
    """Fit the stain normaliser on training images and normalise every used image once (first
    process; the others wait and read the cache). Returns its state, source → cached file, and its
    facts."""
    stain = config.data.stain
    if stain is None:
        return None, {}, None
    from breastvision.data.stain import fit_normalizer
    from breastvision.data.stain_cache import NormalizedImageCache

    train_paths = sorted({i.record.path for i in data.train})
    reference = None if stain.reference == "auto" else stain.reference
    normalizer = fit_normalizer(stain.method, reference=reference, candidates=train_paths)
    cache = NormalizedImageCache(normalizer, stain.cache_dir, device=fabric.device)
    sources = sorted({i.record.path for i in (*data.train, *data.val, *data.test)})
    if fabric.is_global_zero:
        missing = sum(not cache.path_for(s).is_file() for s in sources)
        with progress_bar(fabric, missing, "normalising stains", show) as bar:
            cache.ensure(sources, on_image=bar.advance)
    fabric.barrier()
    targets = cache.ensure(sources)
    facts = {
        "method": stain.method,
        "reference": normalizer.state_dict().get("reference"),
        # Counted from the cache: with a warm cache this run normalised nothing itself.
        "fallback_tiles": len(cache.left_unnormalized(sources)),
    }
    return normalizer.state_dict(), dict(zip(sources, targets, strict=True)), facts


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """What the loop reads: per part (train, val; val_views under ``data.tta``; test for a mask head's
    Dice) a dataset of image views or cached prefix outputs, the part of the model still to run
    before the trainable suffix, and how it got there; and the renderer of the views (the test
    part's augmented draws, on splits drawn after augmentation)."""

    preprocessing: Preprocessing
    renderer: ViewRenderer
    datasets: dict[str, Dataset]
    step_prefix: nn.Module
    cache_facts: dict[str, Any]
    stain_facts: dict[str, Any] | None
    workers: int


def _passes_image_on(prefix: nn.Module, dataset: ViewDataset, fabric: Fabric) -> bool:
    """Whether the frozen prefix's output holds the image itself (a fusion branch left wholly
    trainable: its part of the output has the input's shape), which is not worth caching."""
    x = fabric.to_device(dataset[0][0].unsqueeze(0))
    with torch.no_grad(), fabric.autocast():
        out = prefix.eval()(x)
    parts = out if isinstance(out, tuple) else (out,)
    return any(part.shape == x.shape for part in parts)


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
    elif _passes_image_on(prefix, probe, fabric):
        reasons.append(
            f"the prefix before '{config.model.first_trainable_stage}' hands on the image itself "
            "(a branch trained whole), which is not worth caching"
        )
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
    shape = datasets["train"].item_shape
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


def prepare_inputs(
    config: ExperimentConfig, data: RunData, model: nn.Module, prefix: nn.Module, fabric: Fabric, show: bool
) -> Inputs:
    """Pre-processing, stain normalisation, views and (when worth it) the frozen prefix's cache."""
    preprocessing = _preprocessing(config, model, data)
    preprocessing.stain, normalized, stain_facts = fit_stain(config, data, fabric, show)
    renderer = ViewRenderer(config.data.views, preprocessing, normalized)
    # The test part is scored by the predictor (outputs); only the mask head's Dice runs it here.
    parts = ("train", "val", "test") if config.train.mask_loss_weight else ("train", "val")
    datasets: dict[str, Dataset] = {part: ViewDataset(getattr(data, part), renderer) for part in parts}
    if data.val_views:
        datasets["val_views"] = ViewDataset(data.val_views, renderer)
    if not _use_cache(config, prefix, renderer, datasets["train"], fabric):
        return Inputs(preprocessing, renderer, datasets, prefix, {"used": False}, stain_facts,
                      config.data.num_workers)
    eval_batch = config.train.eval_batch_size or config.train.batch_size
    facts = _cache_features(config, fabric, model, prefix, renderer, datasets, eval_batch, show)
    (log.info if fabric.is_global_zero else log.debug)(
        f"feature cache: {facts['entries_computed']} views computed"
        f"{' by ' + facts['backend'] if facts['backend'] else ''}, "
        f"{facts['entries_reused']} reused (shape {facts['feature_shape']})"
    )
    # The datasets now hold the prefix's outputs, in memory: no loader workers needed.
    return Inputs(preprocessing, renderer, datasets, nn.Identity(), facts, stain_facts, 0)


# -- the run ---------------------------------------------------------------------------------------


def _facts(data: RunData, inputs: Inputs, model: nn.Module, suffix: nn.Module, fabric: Fabric,
           config: ExperimentConfig, state: LoopState, started: float) -> RunFacts:
    return RunFacts(
        **data.facts(),
        stain=inputs.stain_facts,
        feature_cache=inputs.cache_facts,
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=sum(p.numel() for p in suffix.parameters() if p.requires_grad),
        device=str(fabric.device),
        processes=fabric.world_size,
        precision=resolve_precision(config.train),
        epochs_run=len(state.history),
        best_epoch=state.best["epoch"],
        seconds_to_best_epoch=sum(r["seconds"] for r in state.history[: state.best["epoch"]]),
        wall_clock_seconds_this_session=time.perf_counter() - started,
        test_time_augmentation=data.eval_tta,
    )


def _logits(loop: Loop, inputs: Inputs, part: str, config: ExperimentConfig) -> torch.Tensor:
    """One part's logits in item order, by the evaluation path the epochs validate with."""
    tc, dataset = config.train, inputs.datasets[part]
    loader, _ = make_loader(dataset, loop.fabric, tc.eval_batch_size or tc.batch_size, tc.seed, False,
                            inputs.workers)
    return evaluate(loop.fabric, loop.trainable, loop.prefix, loader, len(dataset), loop.num_classes)


def _validation_logits(loop: Loop, inputs: Inputs, config: ExperimentConfig) -> torch.Tensor:
    """V×N×K logits of the N validation images under each of the V views of ``data.tta``'s set
    (V = 1 without one), in the set's order (module docstring)."""
    plain = _logits(loop, inputs, "val", config)
    if "val_views" not in inputs.datasets:
        return plain.unsqueeze(0)
    others = _logits(loop, inputs, "val_views", config).reshape(-1, *plain.shape)
    return torch.cat([plain.unsqueeze(0), others])


def _draws(data: RunData, renderer: ViewRenderer) -> Callable[[Path, str | None], torch.Tensor] | None:
    """How the test part's items are rendered when they are augmented draws (``aug<k>``, a split
    drawn after paper 003's augmentation), which only the run's renderer can regenerate; else
    ``None``: the predictor prepares the files itself."""
    if not any(ViewRenderer.is_draw(item) for item in data.test):
        return None
    items = {(item.record.path, item.view): item for item in data.test}
    return lambda path, view: renderer(items[path, view])


def _mask_inputs(config: ExperimentConfig, data: RunData, inputs: Inputs) -> torch.Tensor:
    """Give the training items their masks (``segmentation.with_training_masks``); return the test
    items'. Masks are rendered from the mask files alone, so this renderer needs no stain cache."""
    renderer = ViewRenderer(config.data.views, inputs.preprocessing)
    inputs.datasets["train"] = with_training_masks(inputs.datasets["train"], data.train, renderer)
    return render_masks(renderer, data.test)


def _run(
    fabric: Fabric, config: ExperimentConfig, run_dir: Path, resume: Path | None,
    checkpoint: dict[str, Any] | None,
) -> RunRecord:
    started = time.perf_counter()
    tc = config.train
    seed_everything(tc.seed % 2**32, verbose=False)
    show = fabric.is_global_zero and wanted(tc.progress)
    say = log.info if fabric.is_global_zero else log.debug

    data = prepare_data(config)
    model, lineage = build_model(config, len(data.class_names))
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    prefix, suffix = freeze_before(model, config.model.first_trainable_stage)
    prepare_mask_head(config, model, suffix, [i.record for i in data.train])
    model.to(fabric.device)
    inputs = prepare_inputs(config, data, model, prefix, fabric, show)
    test_masks = _mask_inputs(config, data, inputs) if tc.mask_loss_weight else None
    loss_fn, balance = classification_loss(tc, inputs.datasets["train"].labels, data.class_names)
    optimizer = make_optimizer(tc, [p for p in suffix.parameters() if p.requires_grad])
    scheduler = make_scheduler(tc, optimizer)
    trainable, optimizer = fabric.setup(suffix, optimizer)
    if tc.mask_loss_weight:
        trainable.mark_forward_method("forward_with_mask")  # through DDP's forward, as gradients need
    num_classes = len(data.class_names)
    loop = Loop(fabric, model, trainable, inputs.step_prefix, optimizer, scheduler, num_classes, show,
                loss_fn.to(fabric.device), make_ema(suffix, tc.ema_decay))
    state = LoopState()
    if checkpoint is not None:
        state = restore(checkpoint, optimizer, scheduler, loop.ema)
        say(f"resuming {resume} after epoch {state.epoch}")
    state = fit(loop, config, inputs.datasets, inputs.workers, state, run_dir, say)

    load_best(run_dir / "checkpoints", model)
    val_labels = [i.record.label for i in data.val]
    val_logits = _validation_logits(loop, inputs, config)
    calibrated = calibrate(val_logits, val_labels, data.class_names,
                           say if fabric.is_global_zero else log.debug)
    val_probs = calibrated_probabilities(val_logits.double().numpy(), calibrated.temperature)
    facts = _facts(data, inputs, model, suffix, fabric, config, state, started)
    facts.class_balance = balance
    if fabric.is_global_zero:
        scope = fit_scope(model, data.train, data.val, inputs.preprocessing, fabric.device, tc.seed, say)
        segmentation = None if test_masks is None else mask_dice(
            fabric, suffix, inputs.step_prefix, inputs.datasets["test"], test_masks,
            tc.eval_batch_size or tc.batch_size)
        trained = Trained(model, inputs.preprocessing, lineage, state, facts, calibrated, scope, val_probs,
                          segmentation)
        write_outputs(run_dir, config, data, trained, fabric.device, _draws(data, inputs.renderer), started)
        say(f"run folder: {run_dir}")
    fabric.barrier()
    return RunRecord.load(run_dir)


def run_dir_for(config: ExperimentConfig, resume: str | Path | None, out: str | Path | None) -> Path:
    """``out``, else the run folder a ``checkpoints/last.ckpt`` sits in, else the config's."""
    if out:
        return Path(out).expanduser()
    if resume and Path(resume).parent.name == "checkpoints":
        return Path(resume).parent.parent
    return config.run_dir


def train(
    config: ExperimentConfig, resume: str | Path | None = None, out: str | Path | None = None
) -> RunRecord:
    """Train (or ``resume`` from a ``last.ckpt``) one run of ``config`` into ``out`` (default: the
    config's ``output_dir``); returns the finished run's record (module docstring)."""
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
