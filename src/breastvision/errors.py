"""Errors that are the user's to fix: the CLI prints them as one line, never a stack trace."""

from __future__ import annotations

from typing import Any


class BreastvisionError(Exception):
    """A problem with the user's input, data or files, explained in its message."""


class DatasetNotFoundError(BreastvisionError):
    """A dataset is not where it was looked for."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with its whitespace runs (newlines included) collapsed, cut at ``limit`` characters:
    library messages quoted in an error must not break the CLI's one-line rule."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe_validation_error(err: Any) -> str:
    """A pydantic ``ValidationError`` as ``where: what (got value); ...``, one line."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        unknown = e["type"] in ("unexpected_keyword_argument", "extra_forbidden")
        msg = "unknown key" if unknown else e["msg"].removeprefix("Value error, ")
        shown = e.get("input")
        if unknown or isinstance(shown, dict) or e["type"] == "missing":
            problems.append(f"{where}: {msg}")
        else:
            problems.append(f"{where}: {msg} (got {one_line(repr(shown), 60)})")
    return "; ".join(problems)
