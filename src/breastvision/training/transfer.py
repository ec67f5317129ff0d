"""Multi-level transfer learning (paper 000, System H): a chain of training stages, each starting
from the previous stage's model file.

Paper 000 (section 2.2) trains in three levels: (1) ImageNet weights; (2) a second pre-training of
the **deep** layers on the LC25000 lung histopathology set while the **shallow** layers keep their
ImageNet features ("浅层网络部分采用 ImageNet 数据集进行预训练，而深层网络 … 采用其他癌类数据集进行
二次预训练"); (3) fine-tuning on the stain-normalised, augmented BreakHis set "mainly by freezing"
("主要采用冻结方式对模型进行微调"). It names no layers. How this module reads it, for
DenseNet-121(+SE), whose stages are ``stem, denseblock1, transition1, denseblock2, transition2,
denseblock3, transition3, denseblock4, head`` (``breastvision.models.staging``):

- *shallow* = the stem and the first two dense blocks with their transitions (56×56 and 28×28
  feature maps: edges, colours, textures — generic features); *deep* = dense blocks 3 and 4 (14×14
  and 7×7: abstract, task-specific features). Stage 2 therefore freezes everything before
  ``denseblock3`` (``configs/lc25000_stage2.yaml``: ``model.first_trainable_stage: denseblock3``).
- "Mainly by freezing" in stage 3 keeps all but the last dense block frozen: ``denseblock4`` (with
  the final norm) and the classifier adapt to BreakHis (``configs/breakhis_multilevel_paper.yaml``).
- SE blocks live inside their dense block or transition, so they freeze and train with it; the SE
  blocks of the shallow stages stay at their near-identity initialisation, i.e. the shallow layers
  compute exactly their ImageNet features, which is the paper's intent.

Both choices are configuration (``model.first_trainable_stage`` per stage), not code.

A chain file lists the stages, each a training config plus overrides; every stage after the first
gets ``model.pretrained`` = the previous stage's ``model.safetensors`` (the classifier is
re-initialised when the class count differs: LC25000 has 3 classes, BreakHis 2), and its model file
records the whole lineage, which every report prints. Stage run folders are ``<out>/<stage>``, or
``<out>/<stage>_fold<k>`` for a fold of a cross-validation. A stage whose folder already holds a
finished run of the same config is reused, not retrained, so the LC25000 stage is trained once for
all the BreakHis folds (``--set breakhis.data.fold=K`` targets the BreakHis stage only).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from breastvision.errors import BreastvisionError
from breastvision.paths import config_path
from breastvision.training.config import (
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    format_validation_error,
    read_yaml,
)
from breastvision.training.engine import train
from breastvision.training.run_record import RunRecord

log = logging.getLogger(__name__)


@dataclass(config=ConfigDict(extra="forbid"))
class StageSpec:
    #: Stage name: its run folder, its lineage entry, and the prefix of overrides meant for it only.
    name: str
    #: Training config of the stage, relative to the chain file.
    config: str
    #: Overrides applied to this stage (``key=value``), before the command line's.
    set: list[str] = Field(default_factory=list)


@dataclass(config=ConfigDict(extra="forbid"))
class ChainConfig:
    name: str
    stages: list[StageSpec]
    output_dir: str = "runs/{name}"


def is_chain(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a transfer chain (it lists ``stages``) rather than one experiment."""
    return "stages" in read_yaml(config_path(path))


def load_chain(path: str | os.PathLike) -> ChainConfig:
    path = config_path(path)
    try:
        chain = ChainConfig(**read_yaml(path))
    except ValidationError as err:
        raise BreastvisionError(format_validation_error(err, str(path))) from None
    except TypeError as err:
        raise BreastvisionError(f"chain config {path}: {err}") from None
    names = [s.name for s in chain.stages]
    if not names:
        raise BreastvisionError(f"chain config {path} lists no stages")
    if len(set(names)) != len(names):
        raise BreastvisionError(f"chain config {path}: stage names must be unique, got {names}")
    clash = set(names) & {f.name for f in dataclasses.fields(ExperimentConfig)}
    if clash:
        raise BreastvisionError(
            f"chain config {path}: stage names {sorted(clash)} clash with config sections"
        )
    return chain


def _stage_overrides(stage: str, stage_names: list[str], overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Command-line overrides for one stage: unprefixed ones go to every stage, ``<stage>.key=v`` to
    that stage only."""
    out = []
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in stage_names:
            if head == stage:
                out.append(rest)
        else:
            out.append(item)
    return out


def stage_configs(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), out: str | os.PathLike | None = None
) -> list[ExperimentConfig]:
    """The resolved config of every stage of a chain file, each writing to ``<out>/<stage name>``
    and starting from the previous stage's model file."""
    path = config_path(path)
    chain = load_chain(path)
    root = Path(out).expanduser() if out else Path(chain.output_dir.format(name=chain.name)).expanduser()
    names = [s.name for s in chain.stages]
    configs: list[ExperimentConfig] = []
    for index, spec in enumerate(chain.stages):
        raw = apply_overrides(read_yaml(path.parent / spec.config), spec.set)
        raw = apply_overrides(raw, _stage_overrides(spec.name, names, overrides))
        raw["stage"] = spec.name
        raw["name"] = f"{chain.name}/{spec.name}"
        fold = (raw.get("data") or {}).get("fold")
        raw["output_dir"] = str(root / (spec.name if fold is None else f"{spec.name}_fold{fold}"))
        if index:
            raw.setdefault("model", {})["pretrained"] = str(configs[-1].run_dir / "model.safetensors")
        configs.append(config_from_dict(raw, f"{path} stage '{spec.name}'"))
    return configs


def _finished(config: ExperimentConfig) -> RunRecord | None:
    """The stage's finished run when its folder holds one of this config (``RunRecord.matches``);
    an error when it holds a finished run of another config (reusing that would silently change
    the experiment)."""
    if not RunRecord.is_finished(config.run_dir):
        return None
    record = RunRecord.load(config.run_dir)
    if record.config is not None and record.matches(config):
        return record
    raise BreastvisionError(
        f"{config.run_dir} holds a finished stage '{config.stage}' trained with another config; "
        "remove it or choose another --out"
    )


def run_chain(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), out: str | os.PathLike | None = None
) -> list[RunRecord]:
    """Train every stage of a chain in order (reusing finished ones); return their run records."""
    records = []
    for config in stage_configs(path, overrides, out):
        record = _finished(config)
        if record is not None:
            log.info(f"stage {config.stage}: reusing {record.model_file}")
        else:
            log.info(f"stage {config.stage}: training into {config.run_dir}")
            record = train(config)
        records.append(record)
    return records
