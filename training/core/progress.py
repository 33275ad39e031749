"""Progress display in one place: one shared rich display, tasks added and removed in it.

Everything human-readable goes to stderr so that `--json` leaves stdout to the JSON line.
Under torchrun only rank 0 shows anything (the other ranks' lines would repeat it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from modeconn.training.core import ranks

console = Console(stderr=True, highlight=False)
_display: Progress | None = None


@contextlib.contextmanager
def display() -> Iterator[Progress]:
    """Keep one live display open across several stages (the pipeline); nested calls reuse it."""
    global _display
    if _display is not None:
        yield _display
        return
    _display = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
    )
    try:
        with _display:
            yield _display
    finally:
        _display = None


@contextlib.contextmanager
def task(description: str, total: int, transient: bool = True) -> Iterator[Callable[..., None]]:
    """A bar with `total` steps; yields `advance(steps=1, status="")`."""
    if not console.is_terminal or not ranks.is_main():  # logs and CI: epoch lines only, no redrawn bars
        yield lambda steps=1, status="": None
        return
    with display() as progress:
        task_id = progress.add_task(description, total=total, status="")

        def advance(steps: int = 1, status: str = "") -> None:
            progress.update(task_id, advance=steps, status=status)

        try:
            yield advance
        finally:
            if transient:
                progress.remove_task(task_id)


def log(message: str) -> None:
    """A line above the bars (one per epoch, stage summaries)."""
    if not ranks.is_main():
        return
    console.print(message, soft_wrap=True)
