"""The README's commands, checked as a new user would type them: each ``breastvision`` line parses
with that sub-command's arguments, the files it names ship with the repository, a resume repeats
the settings its run was trained with, and every command that reads data takes ``--data``."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from breastvision.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
#: The README's ways of calling the command.
PROGRAMS = ("breastvision", ".venv/bin/breastvision", "$B")
#: Sub-commands that read a dataset, by the path of their parsers.
READS_DATA = (("data", "summary"), ("data", "split"), ("train",), ("crossval",), ("transfer",),
              ("evaluate",), ("reproduce", "busi"), ("reproduce", "breakhis"))


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.DOTALL)


def commands() -> list[list[str]]:
    """The argument lists of every ``breastvision`` call in the README's shell blocks."""
    found = []
    for block in bash_blocks(README.read_text()):
        for line in block.splitlines():
            for part in re.split(r"&&|;", line):
                tokens = shlex.split(part, comments=True)
                if tokens and tokens[0] in PROGRAMS:
                    found.append(tokens[1:])
    return found


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_the_readme_has_commands() -> None:
    assert len(commands()) >= 10


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[:3]))
def test_readme_command_parses(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"'breastvision {shlex.join(argv)}' does not parse: {capsys.readouterr().err.strip()}")
    assert getattr(args, "func", None) is not None
    for token in argv:
        if token.startswith("configs/") or token.startswith("scripts/"):
            assert (REPO / token).is_file(), f"the README names {token}, which does not exist"


def test_scripts_the_readme_runs_exist() -> None:
    for block in bash_blocks(README.read_text()):
        for script in re.findall(r"bash (\S+\.sh)", block):
            assert (REPO / script).is_file(), script


def _settings(argv: list[str]) -> tuple[str, list[str]]:
    args = build_parser().parse_args(argv)
    return str(args.config), sorted(args.overrides)


def test_resume_example_repeats_the_run_settings() -> None:
    """A checkpoint resumes only under the config it was started with: the README's resume line
    must give the config and --set values of the train line that made that run folder."""
    trains = [argv for argv in commands() if argv[:1] == ["train"]]
    made = {build_parser().parse_args(a).out: _settings(a) for a in trains if "--out" in a}
    for argv in trains:
        args = build_parser().parse_args(argv)
        if args.resume is None:
            continue
        run = args.resume.parent.parent
        assert run in made, f"the README resumes {args.resume} but trains no run into {run}"
        assert _settings(argv) == made[run], f"'breastvision {shlex.join(argv)}' drops settings of {run}"


@pytest.mark.parametrize("path", READS_DATA, ids=" ".join)
def test_every_command_that_reads_data_takes_data(path: tuple[str, ...]) -> None:
    options = {o for a in _subparser(build_parser(), path)._actions for o in a.option_strings}
    assert "--data" in options


def test_readme_and_example_python_use_only_the_public_api() -> None:
    """Every ``breastvision.<name>`` that a README Python block or an example script uses is
    exported at the top level (``breastvision.__all__``)."""
    import ast

    import breastvision

    sources = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    sources += [p.read_text() for p in sorted((REPO / "examples").glob("*.py"))]
    assert sources
    for source in sources:
        nodes = list(ast.walk(ast.parse(source)))
        used = {n.attr for n in nodes if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "breastvision"}
        used |= {a.name for n in nodes if isinstance(n, ast.ImportFrom) and n.module == "breastvision"
                 for a in n.names}
        assert used <= set(breastvision.__all__), sorted(used - set(breastvision.__all__))
