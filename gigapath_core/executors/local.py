"""In-process executor (the default)."""

from __future__ import annotations

from typing import Callable, Iterator

from .base import Executor


class LocalExecutor(Executor):
    """Processes slides one after another in this process, in input order."""

    name = "local"

    def map(self, fn: Callable[..., dict], config, slides: list, **kwargs) -> Iterator[dict]:
        for slide in slides:
            yield fn(config, slide, **kwargs)
