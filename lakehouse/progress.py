"""Progress on stderr for the jobs: a bar with a count and a spinner, both nothing at all when disabled.

rich is imported only when a display is shown (``--no-progress`` imports nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class ProgressBar:
    """One bar of a running display; its methods do nothing when the display is disabled."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def update(self, completed: int) -> None:
        """Set the count of items done."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=completed)


@contextmanager
def progress_bar(label: str, total: int, *, enabled: bool, unit: str = "") -> Iterator[ProgressBar]:
    """A progress bar on stderr: label, bar, done/total [unit], elapsed time.

    Args:
        label: what is being counted, shown left of the bar.
        total: the count at which the bar is full.
        enabled: False shows nothing (``--no-progress``); the bar's methods then do nothing.
        unit: a word shown after the count (e.g. ``tasks``); none when empty.

    Returns:
        A context manager yielding the :class:`ProgressBar` to advance or update.
    """
    if not enabled:
        yield ProgressBar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit))
    with Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True)) as progress:
        yield ProgressBar(progress, progress.add_task(label, total=total))


@contextmanager
def status(label: str, *, enabled: bool) -> Iterator[None]:
    """A spinner with a label on stderr while something runs (nothing when disabled)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield
