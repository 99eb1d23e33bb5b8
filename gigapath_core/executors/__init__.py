"""Executors map the per-slide unit of work over slides: ``map(fn, config, slides) -> iterator of rows``.

``local`` (default) runs in this process. Other executors (e.g. a cluster engine) implement the same
interface and are chosen by ``executor.name`` in the config or ``--executor``.
"""

from __future__ import annotations

from .base import EXECUTORS, Executor, get_executor
from .local import LocalExecutor

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "get_executor"]
