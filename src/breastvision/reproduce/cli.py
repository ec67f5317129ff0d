"""``breastvision reproduce busi|breakhis|ablation``: each paper's comparison table, or an ablation
table, one command."""

from __future__ import annotations

import argparse
import importlib

#: Reproduction name → module with ``add_arguments(parser)`` and ``run(args) -> int``.
REPRODUCTIONS = {
    "busi": (
        "breastvision.reproduce.busi",
        "System U, paper 003 Table 4: GoogLeNet / ResNet18 / ViT / fusion",
    ),
    "breakhis": (
        "breastvision.reproduce.breakhis",
        "System H, paper 000 Tables 3-5: DenseNet / DenseNet+SE / multi-level, P_arp and P_img",
    ),
    "ablation": (
        "breastvision.reproduce.ablation",
        "what each ingredient of a recipe adds: one cross-validated row per step of a plan",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce", help="reproduce a paper's comparison table (leaky protocol and leak-free)"
    )
    nested = parser.add_subparsers(dest="reproduction", metavar="PAPER", required=True)
    for name, (module_name, summary) in REPRODUCTIONS.items():
        sub = nested.add_parser(name, help=summary, description=summary)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
