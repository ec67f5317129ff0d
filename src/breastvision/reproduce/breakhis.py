"""``breastvision reproduce breakhis``: paper 000's Tables 3, 4 and 5 for System H, on what exists here.

Paper 000 compares DenseNet-121, DenseNet-121+SE and its multi-level transfer model on BreakHis per
magnification (Table 3: patient-level accuracy ``P_arp`` and image-level accuracy ``P_img``), with
their size (Table 4) and time to convergence (Table 5). This command trains the three models under
two protocols and writes the three tables beside the paper's numbers:

- **patient-disjoint 5-fold cross-validation** (``group_kfold``, grouped by *patient*: the slides of
  one person, e.g. 29960AB and 29960CD, stay together; validation = the next fold), the headline:
  every image is tested once by a model that never saw its patient, and the pooled out-of-fold
  predictions (``training.crossval.aggregate_runs``) give one ``P_arp`` / ``P_img`` with
  patient-bootstrap intervals;
- the paper's **random 7:1:2 image split** (``h_random_712``), marked LEAKY: images of one patient
  land in train and test, so its numbers are optimistic and are shown only to compare with the paper.

Table 3 has one column per magnification. The command reads the catalog once (the configured
source and read options), finds the magnifications its records hold (``meta["magnification"]``) and
runs every model under both protocols **per magnification** (``data.options.magnification=<M>``),
or only those named by ``--magnifications 40X,200X``; a column not run reads "—" and the note under
the table says what was run on which images. A copy holding one magnification fills one column.

**Multi-level transfer, as read here** (paper section 2.2 names no layers; ``training/transfer.py``):
stage 1 is the ImageNet weights; stage 2 "second pre-trains the deep layers on LC25000" with the
shallow ones frozen; stage 3 fine-tunes on BreakHis "mainly by freezing" — all but the last dense
block frozen, ``denseblock4`` and the classifier learn. The *paper* preset trains dense blocks 3 and
4 in stage 2 (``lc25000_stage2.yaml``). The *cpu* preset narrows "deep" to ``denseblock4``
(``lc25000_stage2_block4_cpu.yaml``): training dense block 3 as well is several times slower than
the last block alone on cached 512x7x7 inputs, and stage 3's frozen prefix (stem …
transition3) keeps the ImageNet convolution and BatchNorm weights of the DenseNet+SE baseline. Its
SE blocks are drawn before the classifier (``models/densenet.py``), so for the same seed the frozen
prefix — near-identity SE starts included — equals the baseline's, and the multi-level folds reuse
the baseline's feature cache (keyed by the prefix's weights) instead of another pass over BreakHis.
All three cpu models train the same part (denseblock4 + classifier, from ImageNet weights, 2 views
per training image, 5 epochs); the configs' headers say exactly what and why
(``configs/breakhis_*_block4_cpu.yaml``).

The stain reference is one 200X BreakHis image of a patient outside the 40 shared slides
(``breakhis_samples``), so it is the same for every fold, model, protocol and magnification (the
cached normalised images and features are shared) and no test image chooses it.

Output folder (``<mag>/`` only when the data holds more than one magnification, so the runs of a
single-magnification copy keep the layout they were trained in and are reused)::

    out/[<mag>/]cv/<model>/      fold<k>/ run folders (multi-level: pooled report only) + pooled report
    out/[<mag>/]multilevel/      the chain: lc25000/, breakhis_fold<k>/, breakhis/ (leaky); the
                                 LC25000 stage does not depend on the magnification but is trained
                                 once per magnification folder (a chain writes all its stages below
                                 one folder)
    out/[<mag>/]random/<model>/  the leaky random-split runs
    out/reproduce_breakhis.md, .json

Finished runs are reused, so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastvision.data.records import Catalog
from breastvision.errors import BreastvisionError
from breastvision.reproduce.breakhis_tables import MAGNIFICATIONS, MODELS, data_note, hardware_line, render

if TYPE_CHECKING:
    from breastvision.training.run_record import RunRecord


#: A 200X benign image of patient 16184, which is not among the 40 shared slides.
STAIN_REFERENCE = "SOB_B_TA-14-16184-200-025.png"
CV_SPLIT = "{protocol: group_kfold, seed: 0}"
LEAKY_SPLIT = "{protocol: h_random_712, seed: 0}"


@dataclass(frozen=True)
class Preset:
    densenet: str
    densenet_se: str
    multilevel: str
    #: Torch threads per run (``None``: torch's default).
    threads: int | None
    summary: str


PRESETS = {
    "cpu": Preset(
        "breakhis_densenet_block4_cpu.yaml",
        "breakhis_densenet_se_block4_cpu.yaml",
        "breakhis_multilevel_block4_cpu.yaml",
        1,
        "CPU-sized: ImageNet start for all three; stem … transition3 frozen and cached; denseblock4 + "
        "classifier trained 5 epochs (SGD, lr 0.01, cosine, batch 16) on 2 views per training image "
        "(original, rot90); multi-level: LC25000 stage trains denseblock4 for 3 epochs",
    ),
    "paper": Preset(
        "breakhis_densenet_paper.yaml",
        "breakhis_densenet_se_paper.yaml",
        "breakhis_multilevel_paper.yaml",
        None,
        "paper settings (Table 2: batch 16, 200 epochs, lr 0.01, dropout 0.25; baselines from random "
        "init, 5 dihedral views); multi-level: LC25000 trains denseblock3-4, BreakHis denseblock4",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="run sizes (default cpu)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/reproduce_breakhis"),
        metavar="DIR",
        help="output folder (default runs/reproduce_breakhis)",
    )
    parser.add_argument(
        "--data", type=Path, metavar="DIR", help="data root (default: $BREASTVISION_DATA, ../shared/data)"
    )
    parser.add_argument(
        "--folds", type=int, default=5, metavar="K", help="cross-validation folds (default 5)"
    )
    parser.add_argument(
        "--configs",
        type=Path,
        metavar="DIR",
        help="folder of the configs (default: the shipped ones)",
    )
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads per run (cpu preset: 1)")
    parser.add_argument(
        "--magnifications",
        metavar="LIST",
        help="run only these magnifications, e.g. 40X,200X (default: every one the data holds)",
    )
    parser.add_argument(
        "--skip-random",
        action="store_true",
        help="leave out the leaky random-split rows (cross-validation only)",
    )


def _configs_dir(explicit: Path | None) -> Path:
    """``explicit`` (``--configs``), else the shipped configs (package data)."""
    from breastvision.paths import CONFIGS_DIR

    folder = explicit or CONFIGS_DIR
    if not (folder / PRESETS["cpu"].multilevel).is_file():
        raise BreastvisionError(f"no System H configs in {folder} (expected {PRESETS['cpu'].multilevel})")
    return folder


@dataclass(frozen=True)
class Options:
    """What to reproduce: the command's options (``add_arguments``), as a library call takes them."""

    preset: str = "cpu"
    out: Path = Path("runs/reproduce_breakhis")
    #: Data root (``None``: the usual one, ``paths.data_root``).
    data: Path | None = None
    folds: int = 5
    #: Folder of the configs (``None``: the shipped ones).
    configs: Path | None = None
    #: Torch threads per run (``None``: the preset's).
    threads: int | None = None
    #: ``"40X,200X"``; ``None``: every magnification the data holds.
    magnifications: str | None = None
    skip_random: bool = False

    @property
    def run_threads(self) -> int | None:
        return self.threads if self.threads is not None else PRESETS[self.preset].threads


def _overrides(options: Options) -> tuple[list[str], list[str], str]:
    """Overrides for single configs and for the chain (stain settings go to its BreakHis stage only),
    and a line saying which stain reference was used."""
    from breastvision.paths import dataset_dir

    dataset_dir("breakhis", options.data)  # a clear "not found" before anything trains
    common: list[str] = []
    if options.run_threads:
        common.append(f"train.threads={options.run_threads}")
    if options.data is not None:
        common.append(f"data.root={Path(options.data).expanduser().resolve()}")
    try:
        reference = dataset_dir("breakhis_samples", options.data) / STAIN_REFERENCE
    except BreastvisionError:
        reference = None
    if reference is not None and reference.is_file():
        stain = f"data.stain.reference={reference.resolve()}"
        said = f"Macenko, reference {STAIN_REFERENCE} (patient 16184, not among the evaluated slides)"
    else:
        stain = "data.stain.reference=auto"
        said = "Macenko, reference: the most typical training image of each run (breakhis_samples missing)"
    return [*common, stain], [*common, f"breakhis.{stain}"], said


def read_catalog(configs: Path, preset: Preset, single: Sequence[str]) -> Catalog:
    """The catalog the runs will read: the preset's configured source and read options, with the
    command's overrides (``data.root``)."""
    from breastvision.data.readers import read_dataset
    from breastvision.training.config import load_config

    data = load_config(configs / preset.densenet, list(single)).data
    return read_dataset(data.source, data.root, **data.options)


def magnifications_in(catalog: Catalog) -> dict[str, dict[str, int]]:
    """Images, slides and patients per magnification the records hold, in Table 3's order."""
    seen: dict[str, list[Mapping[str, Any]]] = {}
    for record in catalog.records:
        if record.meta.get("magnification") is None:
            raise BreastvisionError(
                f"{catalog.root}: {record.path.name} has no BreakHis magnification; "
                "reproduce breakhis needs official BreakHis names or a BreakHis manifest"
            )
        seen.setdefault(f"{record.meta['magnification']}X", []).append(record.meta)
    return {
        mag: {
            "images": len(metas),
            "slides": len({m.get("slide") for m in metas}),
            "patients": len({m.get("patient") for m in metas}),
        }
        for mag in MAGNIFICATIONS
        if (metas := seen.get(mag))
    }


def choose_magnifications(present: Mapping[str, Any], requested: str | None, where: str) -> list[str]:
    """The magnifications to run: ``requested`` (``"40X,200X"``; None: all present), each present."""
    from breastvision.data.readers.breakhis import parse_magnification

    if requested is None:
        return list(present)
    wanted = set()
    for item in requested.split(","):
        try:
            wanted.add(f"{parse_magnification(item)}X")
        except BreastvisionError as err:
            raise BreastvisionError(f"--magnifications: {err}") from None
    absent = sorted(wanted - set(present), key=MAGNIFICATIONS.index)
    if absent:
        raise BreastvisionError(
            f"--magnifications: {', '.join(absent)} not in the data at {where} "
            f"(it holds {', '.join(present)})"
        )
    return [mag for mag in present if mag in wanted]


def _summary(
    metrics: Mapping[str, Any], runs: Sequence[RunRecord], extra: Sequence[RunRecord] = ()
) -> dict[str, Any]:
    """What the tables need from one model under one protocol: metrics with intervals, sizes, times.
    ``extra`` are runs that belong to the model but are not tested (the chain's LC25000 stage)."""
    facts = [r.facts for r in runs]
    extra_facts = [r.facts for r in extra]
    to_best = [f.seconds_to_best_epoch for f in facts if f.seconds_to_best_epoch is not None]
    sessions = [f.wall_clock_seconds_this_session for f in [*facts, *extra_facts]
                if f.wall_clock_seconds_this_session is not None]
    first = facts[0]
    return {
        "metrics": dict(metrics),
        "run_dirs": [str(r.run_dir) for r in runs],
        "extra_stage_dirs": [str(r.run_dir) for r in extra],
        "parameters": first.parameters,
        "trainable_parameters": first.trainable_parameters,
        "model_file_mb": first.model_file_mb,
        "device": first.device,
        "seconds_to_best_epoch_mean": sum(to_best) / len(to_best) if to_best else None,
        "extra_stage_seconds_to_best_epoch": sum(f.seconds_to_best_epoch or 0.0 for f in extra_facts) or None,
        "wall_clock_seconds_total": sum(sessions) if sessions else None,
        "best_epochs": [f.best_epoch for f in facts],
        "feature_cache": [f.feature_cache for f in facts],
    }


@dataclass(frozen=True)
class _Plan:
    """Where one magnification's runs go and the overrides they get."""

    configs: Path
    preset: Preset
    folds: int
    root: Path
    #: Overrides for single configs, and for the multi-level chain.
    single: list[str]
    chain: list[str]

    def config(self, key: str) -> Path:
        return self.configs / getattr(self.preset, key)


def _cv_single(plan: _Plan, key: str) -> dict[str, Any]:
    from breastvision.training.crossval import run_crossval

    title = f"System H {MODELS[key]}: patient-disjoint {plan.folds}-fold cross-validation"
    cv = run_crossval(plan.config(key), plan.folds, [*plan.single, f"data.split={CV_SPLIT}"],
                      plan.root / "cv" / key, title=title)
    return _summary(cv.summary["pooled"], cv.runs)


def _cv_chain(plan: _Plan, key: str) -> dict[str, Any]:
    """The chain once per fold (its LC25000 stage trained once and reused), the folds pooled."""
    from breastvision.training.crossval import aggregate_runs, chain_folds

    overrides = [*plan.chain, f"breakhis.data.split={CV_SPLIT}"]
    _, chain_of, _ = chain_folds(plan.config(key), plan.folds, overrides, plan.root / key)
    chains = [chain_of(fold) for fold in range(plan.folds)]
    folds, lc = [chain[-1] for chain in chains], chains[-1][-2:-1]
    title = f"System H {MODELS[key]}: patient-disjoint {plan.folds}-fold cross-validation"
    summary = aggregate_runs(folds, plan.root / "cv" / key, title=title)
    return _summary(summary["pooled"], folds, lc)


def _random_single(plan: _Plan, key: str) -> dict[str, Any]:
    from breastvision.training.config import load_config
    from breastvision.training.crossval import train_or_reuse

    config = load_config(plan.config(key), [*plan.single, f"data.split={LEAKY_SPLIT}", "data.fold=null"])
    run = train_or_reuse(config, plan.root / "random" / key, f"{MODELS[key]} (random split)")
    return _summary(run.metrics, [run])


def _random_chain(plan: _Plan, key: str) -> dict[str, Any]:
    from breastvision.training.transfer import run_chain

    overrides = [*plan.chain, f"breakhis.data.split={LEAKY_SPLIT}", "breakhis.data.fold=null"]
    *earlier, last = run_chain(plan.config(key), overrides, out=plan.root / key)
    return _summary(last.metrics, [last], earlier[-1:])


#: Per protocol, how a model is run: a single config, or a transfer chain (the multi-level model).
RUNNERS = {
    "cv": {"single": _cv_single, "chain": _cv_chain},
    "random": {"single": _random_single, "chain": _random_chain},
}
#: Which models are transfer chains.
CHAINS = frozenset({"multilevel"})


def _run_model(plan: _Plan, protocol: str, key: str) -> dict[str, Any]:
    return RUNNERS[protocol]["chain" if key in CHAINS else "single"](plan, key)


def _run_all(options: Options, configs: Path, present: Mapping[str, Any], chosen: list[str],
             overrides: tuple[list[str], list[str]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every model under every protocol, per chosen magnification (``breakhis_tables.Results``)."""
    # With one magnification in the data no filter is needed, and leaving the configs and folders
    # as they were keeps the finished runs of such a copy reusable.
    per_magnification = len(present) > 1
    single, chain = overrides
    protocols = ["cv"] if options.skip_random else ["cv", "random"]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for mag in chosen:
        only = [f"data.options.magnification={mag.removesuffix('X')}"] if per_magnification else []
        root = options.out / mag if per_magnification else options.out
        plan = _Plan(configs, PRESETS[options.preset], options.folds, root, [*single, *only],
                     [*chain, *(f"breakhis.{o}" for o in only)])
        results[mag] = {p: {key: _run_model(plan, p, key) for key in MODELS} for p in protocols}
    return results


def reproduce(options: Options) -> str:
    """Train (or reuse) every run, write ``reproduce_breakhis.md`` and ``.json`` into
    ``options.out`` and return the markdown (module docstring)."""
    if options.folds < 2:
        raise BreastvisionError(f"--folds must be at least 2 (got {options.folds})")
    preset = PRESETS[options.preset]
    configs = _configs_dir(options.configs)
    single, chain, stain = _overrides(options)
    catalog = read_catalog(configs, preset, single)
    present = magnifications_in(catalog)
    chosen = choose_magnifications(present, options.magnifications, str(catalog.root))
    results = _run_all(options, configs, present, chosen, (single, chain))
    skipped = ["the leaky random-split rows (--skip-random)"] if options.skip_random else []
    per_magnification = len(present) > 1
    data = data_note(present, chosen, str(catalog.root), per_magnification)
    markdown = render(results, preset=options.preset, summary=preset.summary, folds=options.folds,
                      hardware=hardware_line(options.run_threads), stain=stain, data=data, skipped=skipped)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "reproduce_breakhis.md").write_text(markdown)
    document = {
        "preset": options.preset,
        "folds": options.folds,
        "stain": stain,
        "data": data,
        "magnifications": {"present": present, "run": chosen, "per_magnification_folders": per_magnification},
        "skipped": skipped,
        "results": results,
    }
    (options.out / "reproduce_breakhis.json").write_text(json.dumps(document, indent=1, default=float))
    return markdown


def run(args: argparse.Namespace) -> int:
    """The command: :func:`reproduce` with the parsed options, the tables printed."""
    fields = {f.name for f in dataclasses.fields(Options)}
    print(reproduce(Options(**{k: v for k, v in vars(args).items() if k in fields})))
    return 0
