"""``breastvision data summary`` and ``breastvision data split``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from breastvision.errors import BreastvisionError


def _source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="data root for named datasets (default: $BREASTVISION_DATA, ...)")
    parser.add_argument(
        "--group-by", choices=("slide", "patient"), help="BreakHis grouping (default: slide, BreakHis's own)"
    )
    parser.add_argument(
        "--magnification", action="append", help="BreakHis: keep only this magnification (40, 100, 200, 400X)"
    )
    parser.add_argument(
        "--no-near-duplicates", action="store_true", help="BUSI: skip perceptual hashing (groups = images)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="decode every image in full (finds truncated files)"
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data", help="inspect datasets and make splits", description="Inspect datasets and make splits."
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    summary = commands.add_parser(
        "summary",
        help="counts per class, magnification and group; sizes, masks, near-duplicates, skipped files",
        description="Summarise datasets; with no SOURCE, every known dataset found under the data root.",
    )
    summary.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="dataset name (busi, breakhis, breakhis_samples, lc25000), folder or manifest CSV",
    )
    _source_options(summary)
    summary.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    summary.set_defaults(func=run_summary)

    split = commands.add_parser(
        "split",
        help="write a reproducible split file (paper protocols, leaky, or leak-free grouped ones)",
        description="Make a split of a dataset and save it as JSON.",
    )
    split.add_argument("source", metavar="SOURCE", help="dataset name, folder or manifest CSV")
    split.add_argument("--protocol", default="group_holdout", help="split protocol (default: group_holdout)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--k", type=int, default=5, help="folds for group_kfold (default: 5)")
    split.add_argument("--fractions", help="train,val,test for group_holdout (default: 0.7,0.1,0.2)")
    split.add_argument("--external", help="u_random_82: external validation folder or manifest")
    split.add_argument("--out", type=Path, required=True, help="split file to write (JSON)")
    _source_options(split)
    split.set_defaults(func=run_split)


def _reader_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "group_by": args.group_by,
        "magnification": args.magnification,
        "near_duplicates": False if args.no_near_duplicates else None,
        "verify": True if args.verify else None,
    }


def run_summary(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from breastvision.data.readers import KNOWN_DATASETS, applicable_options, read_dataset
    from breastvision.data.summary import print_summary, summarize
    from breastvision.errors import DatasetNotFoundError
    from breastvision.paths import data_root

    console = Console()
    options = _reader_options(args)
    sources = args.sources or list(KNOWN_DATASETS)
    results = []
    for source in sources:
        try:
            # Over several datasets, options go where they apply (the summary prints what was used).
            wanted = applicable_options(source, args.data, options) if len(sources) > 1 else options
            catalog = read_dataset(source, root=args.data, **wanted)
        except DatasetNotFoundError as err:
            if args.sources:
                raise
            console.print(f"[yellow]skipped {source}:[/yellow] {err}")
            continue
        summary = summarize(catalog)
        print_summary(summary, console)
        results.append(summary)
    if not results:
        raise BreastvisionError(f"no dataset found under {data_root(args.data)} (give --data DIR)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        console.print(f"wrote {args.json}")
    return 0


def _fractions(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise BreastvisionError(f"--fractions '{text}' must be three numbers like 0.7,0.1,0.2") from None


def run_split(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from breastvision.data.readers import read_dataset
    from breastvision.data.splits import PARTS, make_split, straddling_groups

    console = Console()
    catalog = read_dataset(args.source, root=args.data, **_reader_options(args))
    external = read_dataset(args.external, root=args.data) if args.external else None
    split = make_split(
        catalog, args.protocol, args.seed, k=args.k, fractions=_fractions(args.fractions), external=external
    )
    path = split.save(args.out)
    folds = list(range(split.k)) if split.k else [None]
    straddle = []
    for fold in folds:
        counts = split.counts(catalog, fold)
        title = f"{split.protocol} on {catalog.name}" + (f", fold {fold}" if fold is not None else "")
        table = Table(title=title, title_justify="left")
        table.add_column("part")
        for name in catalog.class_names:
            table.add_column(name, justify="right")
        table.add_column("total", justify="right")
        for part in PARTS:
            row = counts[part]
            if part == "val" and external is not None:
                row = split.counts(external)["val"]
            table.add_row(part, *(str(row.get(n, 0)) for n in catalog.class_names), str(sum(row.values())))
        console.print(table)
        straddle.append(len(straddling_groups(catalog, split, fold)))
    unit = "image views" if split.views else "images"
    console.print(f"{split.n_files} files, counts in {unit}; grouping: {split.grouping}; seed {split.seed}")
    if split.leaky:
        console.print(f"[bold red]LEAKY[/bold red] ({split.params['description']}): {split.leak_reason}")
    else:
        console.print(
            f"[green]leak-free[/green]: groups on more than one side: {max(straddle)} "
            f"(of {len(set(catalog.groups))} {split.grouping} groups)"
        )
    skipped = len(catalog.skipped) + (len(external.skipped) if external else 0)
    console.print(f"wrote {path}; {skipped} files skipped while reading (see `breastvision data summary`)")
    return 0
