"""Executor interface and lookup."""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator

from ..errors import ConfigError

#: executor name -> "module:Class" (imported lazily so optional engines cost nothing until used)
EXECUTORS: dict[str, str] = {"local": "gigapath_core.executors.local:LocalExecutor"}


class Executor(abc.ABC):
    """Maps ``fn(config, slide) -> row`` over slides; yields rows as slides finish (any order)."""

    name: str = ""

    @abc.abstractmethod
    def map(self, fn: Callable[..., dict], config: Any, slides: list) -> Iterator[dict]:
        """Yield one manifest row per slide. A slide's own failure is a row, never an exception."""

    def close(self) -> None:
        """Release workers."""


def get_executor(name: str, **params: Any) -> Executor:
    """Instantiate executor ``name``. Raises ConfigError listing the valid names."""
    import importlib

    if name not in EXECUTORS:
        raise ConfigError("executor.name", f"unknown executor {name!r}; valid choices: {', '.join(EXECUTORS)}")
    module, cls = EXECUTORS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**params)
    except TypeError as err:
        raise ConfigError("executor.params", str(err)) from None
