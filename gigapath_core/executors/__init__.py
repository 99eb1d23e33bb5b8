"""Executors map the per-slide unit of work over slides: ``map(fn, config, slides) -> iterator of rows``.

``local`` (default) runs in this process, or in a pool of worker processes (``workers: N``); ``ray`` runs on
a Ray cluster (optional extra ``gigapath-core[ray]``, imported only when chosen). Both are chosen by
``executor: {name, params}`` in the config or ``--executor``; ``--shard k/N`` slices the slides for job
arrays. See ``docs/scale_out.md``.
"""

from __future__ import annotations

from .base import EXECUTORS, Executor, ExecutorParams, get_executor, map_until_done
from .local import LocalExecutor
from .sharding import parse_shard, shard_slides
from .slide_lock import SlideLock

__all__ = ["EXECUTORS", "Executor", "ExecutorParams", "LocalExecutor", "SlideLock", "get_executor",
           "map_until_done", "parse_shard", "shard_slides"]
