"""Rich consoles: `out` for results a user or script reads (stdout), `err` for messages and progress (stderr)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

out = Console()
err = Console(stderr=True)


def progress() -> Progress:
    """A progress display on stderr: description, bar, done/total, elapsed and remaining time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    with progress() as bar:
        yield from bar.track(items, total=total, description=description)
