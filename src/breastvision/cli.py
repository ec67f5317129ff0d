"""The ``breastvision`` command. Each package contributes its sub-commands through ``register``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from breastvision import __version__
from breastvision.errors import BreastvisionError

#: Modules with a ``register(subparsers)`` function; imported lazily so ``--help`` stays fast.
COMMAND_MODULES = (
    "breastvision.data.cli",
    "breastvision.training.cli",
    "breastvision.evaluation.cli",
    "breastvision.serving.cli",
    "breastvision.slide.cli",
    "breastvision.reproduce.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breastvision",
        description="Train, evaluate, explain and serve breast-cancer image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"breastvision {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except BreastvisionError as err:
        print(f"breastvision: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("breastvision: interrupted", file=sys.stderr)
        return 130
