"""Progress bars for long commands, on stderr and only on a terminal.

rich draws them: it is already installed (typer depends on it), so no new dependency. A
bar never goes to a pipe, a file or a CI log: there it would be noise (or, without a
terminal to redraw on, a line per refresh), and stdout stays the command's output.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol, TextIO


class Advance(Protocol):
    """Set how much is done so far (and the total, once it is known)."""

    def __call__(self, done: float, total: float | None = None) -> None: ...


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr) is a terminal a bar can be redrawn on."""
    s = sys.stderr if stream is None else stream
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _off(done: float, total: float | None = None) -> None:
    return None


@contextlib.contextmanager
def bar(description: str, total: float | None, *, show: bool | None = None) -> Iterator[Advance]:
    """A transient bar of ``total`` steps; yields a function taking how much is done.
    ``show``: None draws it when stderr is a terminal, False never, True always (stderr)."""
    if show is False or (show is None and not on_terminal()):
        yield _off
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        # --progress asked for it: drawn even where rich would not (a pipe, a log).
        console=Console(file=sys.stderr, force_terminal=True if show else None),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(done: float, total: float | None = None) -> None:
            if total is not None:
                progress.update(task, total=total)
            progress.update(task, completed=done)

        yield advance
