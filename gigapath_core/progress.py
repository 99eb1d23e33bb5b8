"""Progress bars (rich). Disabled with ``GIGAPATH_PROGRESS=0``; rich renders plainly when not a terminal."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=os.environ.get("GIGAPATH_PROGRESS", "1") == "0",
        transient=False,
    )
