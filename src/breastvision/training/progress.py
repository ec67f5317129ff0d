"""A rich progress bar showing running loss and accuracy, drawn by the first process only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def wanted(setting: str) -> bool:
    """``auto`` draws only on a terminal, so logs and CI output stay readable."""
    return setting == "rich" or (setting == "auto" and sys.stderr.isatty())


class Bar:
    def __init__(self, progress: Progress | None, task: TaskID | None):
        self._progress = progress
        self._task = task

    def advance(self, **stats: float) -> None:
        """One step done; ``stats`` (e.g. ``loss=0.61, acc=0.72``) are shown beside the bar."""
        if self._progress is None or self._task is None:
            return
        text = "  ".join(f"{k} {v:.4f}" for k, v in stats.items())
        self._progress.update(self._task, advance=1, stats=text)


@contextmanager
def progress_bar(fabric: Any, total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    if not enabled or not fabric.is_global_zero:
        yield Bar(None, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
    )
    with Progress(*columns) as progress:
        yield Bar(progress, progress.add_task(description, total=total, stats=""))
