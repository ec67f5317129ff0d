"""``breastvision reproduce ablation PLAN``: what each ingredient of a recipe adds, one table.

A plan (YAML; shipped ones in ``configs/ablations/``) lists steps, each a config plus ``--set``
overrides, usually cumulative (each step adds one ingredient to the one before). Every step is a
full k-fold cross-validation (``training.crossval.run_crossval``, finished folds reused, so an
interrupted ablation continues where it stopped) and becomes one row:

- **validation** columns: the folds' validation predictions pooled (``crossval``'s
  ``validation``), which is what the recipe was chosen on;
- **test** columns: the pooled out-of-fold test predictions with 95% bootstrap intervals
  (resampling near-duplicate groups or patients), reported, never chosen on;
- the wall-clock: the sum of the folds' training sessions; it is a cold-cache time only if the
  feature cache was empty when the step ran (point ``$BREASTVISION_CACHE`` at an empty folder).

Plan format::

    title: what the table is about
    folds: 5
    metrics: [accuracy, recall_macro, per_class.malignant.auc]   # dotted paths into metrics.json
    steps:
      - {label: "frozen fusion head", config: busi_fusion_cpu_noaug.yaml}
      - {label: "+ class-balanced loss", config: busi_fusion_cpu_noaug.yaml,
         set: [train.class_weighting=balanced], name: balanced}   # folder OUT/balanced
      - {label: "ensemble of both", ensemble: [frozen_fusion_head, balanced]}
      - {label: "ensemble chosen on validation", select: {candidates: [frozen_fusion_head, balanced],
         metric: recall_macro}}

A ``context`` step puts an earlier step's predictions in patient context
(``evaluation.context``): each image's probabilities blended with its patient's mean, the weight
chosen among ``weights`` on the pooled validation predictions alone, then applied to every fold's
test predictions. It needs a patient-grouped split (BreakHis)::

      - {label: "+ patient context", context: {of: balanced, weights: [0, 0.5, 1]}}

A ``select`` step is an ensemble whose members are chosen on the pooled validation predictions
alone: greedy forward selection with replacement (Caruana et al., ICML 2004). Each round adds the
candidate that most raises the validation ``metric`` of the mean; it stops when no candidate raises
it or after ``rounds`` rounds. A member picked twice weighs twice. The test columns of that row are
then the fold-by-fold mean of the chosen members, as for ``ensemble``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

from breastvision.errors import BreastvisionError, describe_validation_error
from breastvision.paths import CONFIGS_DIR

log = logging.getLogger(__name__)

PLANS_DIR = CONFIGS_DIR / "ablations"
#: Columns every table has besides the plan's ``metrics``.
VALIDATION_COLUMNS = ("accuracy", "recall_macro")


@dataclass(config=ConfigDict(extra="forbid"))
class Selection:
    """Which earlier steps an ensemble may use, and the validation metric that picks among them."""

    candidates: list[str]
    #: A dotted path into the metrics of the pooled validation predictions.
    metric: str = "recall_macro"
    rounds: int = Field(default=5, ge=1)


@dataclass(config=ConfigDict(extra="forbid"))
class Context:
    """An earlier step put in patient context, its weight chosen on validation."""

    of: str
    weights: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    #: A dotted path into the metrics of the pooled validation predictions.
    metric: str = "recall_macro"


@dataclass(config=ConfigDict(extra="forbid"))
class Step:
    """One row: a config cross-validated with ``set`` overrides, or with ``ensemble`` the mean of
    earlier steps' calibrated probabilities, fold by fold (each fold's members never saw its test
    images, so the pooled result is still out of fold), with ``select`` such a mean chosen on
    validation, or with ``context`` an earlier step in patient context (module docstring)."""

    label: str
    config: str | None = None
    set: list[str] = Field(default_factory=list)
    ensemble: list[str] = Field(default_factory=list)
    select: Selection | None = None
    context: Context | None = None
    #: The step's folder under the output folder; default: the label made a file name (:func:`slug`).
    name: str | None = None

    @property
    def folder(self) -> str:
        return self.name or slug(self.label)


@dataclass(config=ConfigDict(extra="forbid"))
class Plan:
    title: str
    steps: list[Step]
    folds: int = Field(default=5, ge=2)
    metrics: list[str] = Field(default_factory=lambda: ["accuracy", "recall_macro", "auc"])

    def __post_init__(self) -> None:
        seen: list[str] = []
        for step in self.steps:
            kinds = [step.config is not None, bool(step.ensemble), step.select is not None,
                     step.context is not None]
            if sum(kinds) != 1:
                raise ValueError(f"step '{step.label}' needs one of a config, an ensemble of earlier steps, "
                                 "a selection among them or the patient context of one")
            members = (step.ensemble or (step.select.candidates if step.select else [])
                       or ([step.context.of] if step.context else []))
            if any(name not in seen for name in members):
                raise ValueError(f"step '{step.label}': it uses steps that are not earlier steps {seen}")
            seen.append(step.folder)

    @classmethod
    def read(cls, path: str | os.PathLike) -> Plan:
        """A plan file; a bare name is looked up among the shipped plans."""
        import yaml

        path = Path(path)
        if not path.is_file() and (PLANS_DIR / path).is_file():
            path = PLANS_DIR / path
        if not path.is_file():
            shipped = ", ".join(sorted(p.name for p in PLANS_DIR.glob("*.yaml")))
            raise BreastvisionError(f"ablation plan not found: {path} (shipped: {shipped})")
        try:
            return cls(**(yaml.safe_load(path.read_text()) or {}))
        except ValidationError as err:
            raise BreastvisionError(f"ablation plan {path}: {describe_validation_error(err)}") from None
        except TypeError as err:
            raise BreastvisionError(f"ablation plan {path}: {err}") from None


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") or "step"


def run_steps(plan: Plan, out: Path, overrides: list[str]) -> list[dict[str, Any]]:
    """Cross-validate every step into ``out/<slug>``; the ``crossval.json`` summaries in order.
    Ensemble, selection and context steps read their members' fold records as the earlier steps returned
    them (a transfer chain's folds included), never from folder names."""
    from breastvision.paths import config_path
    from breastvision.training.crossval import run_crossval

    summaries, folds_of = [], {}
    for number, step in enumerate(plan.steps, 1):
        log.info(f"ablation step {number}/{len(plan.steps)}: {step.label}")
        title = f"{plan.title}: {step.label}"
        if step.config is not None:
            cv = run_crossval(config_path(step.config), plan.folds, [*overrides, *step.set],
                              out / step.folder, title=title)
            folds_of[step.folder] = cv.runs
            summaries.append(cv.summary)
            continue
        if step.context is not None:
            summary, folds_of[step.folder] = context_folds(folds_of[step.context.of], step.context,
                                                           out / step.folder, title)
            summaries.append(summary)
            continue
        members = step.ensemble or select_members(folds_of, step.select)
        member_folds = [folds_of[m] for m in members]
        summary, folds_of[step.folder] = ensemble_folds(member_folds, out / step.folder, title)
        if step.select is not None:
            log.info(f"chosen on validation {step.select.metric}: {', '.join(members)}")
            choice = {"metric": step.select.metric, "candidates": step.select.candidates, "members": members}
            (out / step.folder / "selection.json").write_text(json.dumps(choice, indent=1))
            summary = {**summary, "selected": members}
        summaries.append(summary)
    return summaries


def _mean_predictions(parts: list[Any]) -> Any:
    """The members' predictions of one fold averaged, aligned on the first member's image keys (no
    decision or scope columns: those belonged to each member's own model file)."""
    import numpy as np

    from breastvision.training.run_record import Predictions

    first = parts[0]
    rows = [dict(zip(p.keys, p.probs, strict=True)) for p in parts]
    if any(set(r) != set(first.keys) for r in rows) or any(p.class_names != first.class_names for p in parts):
        raise BreastvisionError("ensemble members of one fold must predict the same images and classes")
    probs = np.mean([[r[k] for k in first.keys] for r in rows], axis=0)
    return Predictions(first.keys, first.groups, first.y_true, probs, first.class_names,
                       subtypes=first.subtypes)


def _validations(name: str, runs: list[Any]) -> list[Any]:
    """Each fold's validation predictions; a one-line error naming a fold without them."""
    missing = next((r.run_dir for r in runs if r.val_predictions is None), None)
    if missing is not None:
        raise BreastvisionError(f"step {name}: {missing} has no validation predictions to select on")
    return [r.val_predictions for r in runs]


def _pooled_validation(name: str, runs: list[Any]) -> Any:
    from breastvision.training.crossval import pooled_validation

    _validations(name, runs)
    return pooled_validation(runs)


def select_members(folds_of: dict[str, list[Any]], selection: Selection) -> list[str]:
    """Greedy forward selection with replacement on the candidates' pooled validation predictions
    (module docstring); ties go to the earlier candidate."""
    from breastvision.evaluation.metrics import compute_metrics
    from breastvision.evaluation.report import lookup_number

    pooled = {name: _pooled_validation(name, folds_of[name]) for name in selection.candidates}
    first = pooled[selection.candidates[0]]
    if any(p.keys != first.keys or p.class_names != first.class_names for p in pooled.values()):
        raise BreastvisionError("selection candidates must be validated on the same images and classes")

    def score(probs: Any) -> float:
        return lookup_number(compute_metrics(first.y_true, probs, first.class_names), selection.metric,
                             "selection")

    chosen: list[str] = []
    total, best = 0.0, float("-inf")
    for _ in range(selection.rounds):
        scores = {name: score((total + p.probs) / (len(chosen) + 1)) for name, p in pooled.items()}
        name = max(scores, key=scores.__getitem__)
        if scores[name] <= best:
            break
        chosen.append(name)
        total, best = total + pooled[name].probs, scores[name]
    return chosen


def ensemble_folds(members: list[list[Any]], target: Path, title: str) -> tuple[dict[str, Any], list[Any]]:
    """Fold by fold, the mean of the members' (each a step's fold records) calibrated test and
    validation probabilities, pooled like a cross-validation (``crossval.aggregate_runs``) into
    ``target``; the summary and the mean's fold records."""
    from breastvision.training.crossval import aggregate_runs

    records = []
    for fold, runs in enumerate(zip(*members, strict=True)):
        test = _mean_predictions([r.predictions for r in runs])
        vals = [r.val_predictions for r in runs]
        val = _mean_predictions(vals) if None not in vals else None
        # A member chosen twice was trained once.
        walls = [r.facts.wall_clock_seconds_this_session for r in {id(r): r for r in runs}.values()]
        records.append(_derived_record(runs[0], target / f"fold{fold}", test, val,
                                       None if None in walls else float(sum(walls))))
    return aggregate_runs(records, target, title=title), records


def _derived_record(run: Any, run_dir: Path, test: Any, val: Any, wall: float | None) -> Any:
    """A fold record of predictions derived from trained folds (an ensemble, a context): ``run``'s
    config and split, the new predictions and their metrics, the trained folds' wall-clock."""
    import dataclasses

    from breastvision.evaluation.report import evaluate_predictions
    from breastvision.training.run_record import RunFacts

    metrics = evaluate_predictions(test.y_true, test.probs, test.class_names, n_resamples=0)
    return dataclasses.replace(run, run_dir=run_dir, metrics=metrics, predictions=test, val_predictions=val,
                               facts=RunFacts(wall_clock_seconds_this_session=wall))


def context_folds(
    runs: list[Any], context: Context, target: Path, title: str
) -> tuple[dict[str, Any], list[Any]]:
    """``runs`` (a step's fold records) in patient context, the weight chosen on their pooled
    validation predictions; pooled into ``target`` like :func:`ensemble_folds`, with the choice
    and every weight's validation score in ``target/context.json``."""
    from breastvision.data.records import PATIENT_GROUPINGS
    from breastvision.evaluation.context import choose_weight, in_context
    from breastvision.training.crossval import aggregate_runs, pooled_grouping

    # The rule the pooled report uses to decide whether its groups are patients.
    if pooled_grouping(runs) not in PATIENT_GROUPINGS:
        raise BreastvisionError(f"step {context.of}: patient context needs folds split by patient "
                                f"({', '.join(sorted(PATIENT_GROUPINGS))}); these groups are not patients")
    weight, scores = choose_weight(_validations(context.of, runs), context.weights, context.metric)
    log.info(f"patient context of {context.of}: weight {weight} chosen on validation {context.metric}")
    records = [_derived_record(r, target / f"fold{fold}", in_context(r.predictions, weight),
                               in_context(r.val_predictions, weight), r.facts.wall_clock_seconds_this_session)
               for fold, r in enumerate(runs)]
    summary = aggregate_runs(records, target, title=title)
    choice = {"of": context.of, "metric": context.metric, "weight": weight,
              "validation": {str(w): v for w, v in scores.items()}}
    (target / "context.json").write_text(json.dumps(choice, indent=1))
    return {**summary, "context_weight": weight}, records


def table(plan: Plan, summaries: list[dict[str, Any]]) -> str:
    """The markdown table of the module docstring."""
    from breastvision.evaluation.report import lookup, markdown_table, with_interval

    header = ["step", *(f"val {m}" for m in VALIDATION_COLUMNS), *(f"test {m}" for m in plan.metrics),
              "minutes"]
    rows = []
    for step, summary in zip(plan.steps, summaries, strict=True):
        validation = summary.get("validation") or {}
        wall = summary.get("wall_clock_seconds")
        label = step.label
        if summary.get("selected"):
            label += f" ({' + '.join(summary['selected'])})"
        if summary.get("context_weight") is not None:
            label += f" (weight {summary['context_weight']:g})"
        rows.append([label, *(validation.get(m) for m in VALIDATION_COLUMNS),
                     *(with_interval(summary["pooled"], m) for m in plan.metrics),
                     None if wall is None else f"{wall / 60:.1f}"])
    n = lookup(summaries[0]["pooled"], "n_images") if summaries else None
    resampled = lookup(summaries[0]["pooled"], "bootstrap.resampled") if summaries else None
    return (f"### {plan.title}\n\n{plan.folds}-fold cross-validation, {n} images pooled out of fold; "
            f"test intervals: 95% bootstrap over {resampled}. Validation columns: the folds' "
            "validation predictions pooled (what the recipe is chosen on).\n\n"
            + markdown_table(header, rows))


def reproduce_ablation(plan: Plan, out: Path, overrides: list[str] = ()) -> str:
    """Run the plan into ``out`` and write ``out/ablation.md`` and ``out/ablation.json``."""
    from breastvision.evaluation.report import with_interval

    summaries = run_steps(plan, out, list(overrides))
    text = table(plan, summaries)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text + "\n")
    rows = [{"label": s.label, "config": s.config, "set": s.set,
             "ensemble": summary.get("selected", s.ensemble),
             "context_weight": summary.get("context_weight"),
             "validation": summary.get("validation"),
             "test": {m: with_interval(summary["pooled"], m) for m in plan.metrics},
             "wall_clock_seconds": summary.get("wall_clock_seconds")}
            for s, summary in zip(plan.steps, summaries, strict=True)]
    summary = {"title": plan.title, "rows": rows}
    (out / "ablation.json").write_text(json.dumps(summary, indent=1, default=float))
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="ablation plan YAML (a path or a shipped name, "
                        "e.g. busi.yaml)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output folder (default runs/ablation_<plan>)")
    parser.add_argument("--data", type=Path, metavar="DIR", help="data root (default: the usual data root)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every step (repeatable)")


def run(args: argparse.Namespace) -> int:
    plan = Plan.read(args.plan)
    out = args.out or Path(f"runs/ablation_{Path(args.plan).stem}")
    data = [f"data.root={Path(args.data).expanduser().resolve()}"] if args.data else []
    print(reproduce_ablation(plan, out, [*data, *args.overrides]))
    print(f"table: {out / 'ablation.md'}")
    return 0
