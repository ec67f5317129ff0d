"""Progress with running loss and accuracy, from the first process only: a rich bar on a terminal,
else plain log lines for slow loops (so background runs' logs show where they are)."""

from __future__ import annotations

import logging
import sys
import time
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


log = logging.getLogger(__name__)


class Bar:
    def __init__(self, progress: Progress | None, task: TaskID | None):
        self._progress = progress
        self._task = task

    def advance(self, **stats: float) -> None:
        """One step done; ``stats`` (e.g. ``loss=0.61, acc=0.72``) are shown beside the bar."""
        if self._progress is None or self._task is None:
            return
        self._progress.update(self._task, advance=1, stats=_format(stats))


class LogLines(Bar):
    """The same interface, as log lines at tenths of ``total`` steps, at most one per ``QUIET_S``
    seconds, so quick loops (a cached head's epoch) stay silent and slow ones show their pace."""

    QUIET_S = 15.0

    def __init__(self, total: int, description: str):
        super().__init__(None, None)
        self._total, self._description = total, description
        self._done = 0
        self._started = self._last = time.perf_counter()
        self._every = max(1, total // 10)

    def advance(self, **stats: float) -> None:
        self._done += 1
        now = time.perf_counter()
        at_tenth = self._done % self._every == 0 or self._done == self._total
        if not at_tenth or now - self._last < self.QUIET_S:
            return
        self._last = now
        elapsed = now - self._started
        log.info(
            "%s %d/%d  %.0fs elapsed  %s", self._description, self._done, self._total, elapsed, _format(stats)
        )


def _format(stats: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in stats.items())


@contextmanager
def progress_bar(fabric: Any, total: int, description: str, enabled: bool = True) -> Iterator[Bar]:
    """A bar (``enabled``) or log lines for ``total`` steps, drawn by the first process only;
    ``fabric`` ``None`` outside training (one process)."""
    if fabric is not None and not fabric.is_global_zero:
        yield Bar(None, None)
        return
    if not enabled:
        yield LogLines(total, description)
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
