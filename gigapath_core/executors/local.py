"""The local executor (default): slides one after another in this process, or a pool of worker processes.

``workers: 1`` (default) runs in the calling process, in input order, with tile progress. ``workers: N``
starts N spawned worker processes (each builds the models once and uses ``threads_per_worker`` torch
threads). A worker that dies breaks the pool: it is replaced, and the slides that were in flight are re-run
one at a time, so the slide that kills its worker is found; it is retried ``max_retries`` times, then
recorded as failed (``WorkerDied``). Workers end with the process that started them, even on ``kill -9``
(:func:`gigapath_core.watchdog.exit_with_parent`).
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator

from pydantic import Field, StrictInt

from ..cli import LIBRARY_LOGGERS
from .base import Executor, ExecutorParams
from .worker import call_slide, raise_config_error, worker_died_row


def _init_worker(threads: int, parent_pid: int) -> None:
    import torch

    from ..watchdog import exit_with_parent

    exit_with_parent(parent_pid)  # an idle worker would otherwise outlive a kill -9 of the run (issue #11)
    from ..weights import random_weights_said_by_parent

    random_weights_said_by_parent()  # the run said it before starting the pool
    torch.set_num_threads(threads)
    os.environ.setdefault("GIGAPATH_PROGRESS", "0")
    for name in LIBRARY_LOGGERS:  # tifffile's / libvips' own lines about a file: not on the console (cli.py)
        logging.getLogger(name).addHandler(logging.NullHandler())


def _build_models(config: Any, stages: list[str] | None = None) -> None:
    from ..pipeline import get_models

    get_models(config, stages)


class LocalExecutor(Executor):
    """Slides in this process (``workers: 1``) or in a pool of ``workers`` processes on this machine."""

    name = "local"

    class Params(ExecutorParams):
        workers: StrictInt = Field(1, ge=1, le=1024,
                                   description="slides processed at once; > 1 = a pool of worker processes")
        threads_per_worker: StrictInt | None = Field(
            None, ge=1, le=4096, description="torch CPU threads per pool worker (default: cores / workers)")
        max_retries: StrictInt = Field(2, ge=0, le=100, description="re-runs of a slide whose worker process died")

    def __init__(self, workers: int = 1, threads_per_worker: int | None = None, max_retries: int = 2):
        self.workers, self.max_retries = workers, max_retries
        self.threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
        self.in_process = workers == 1
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[..., dict], config: Any, slides: list, **kwargs: Any) -> Iterator[dict]:
        if self.in_process:
            for slide in slides:
                yield fn(config, slide, **kwargs)
            return
        yield from self._map_pool(fn, config, slides)

    # ------------------------------------------------------------------------------ process pool
    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self.threads, os.getpid()))

    def _map_pool(self, fn: Callable[..., dict], config: Any, slides: list) -> Iterator[dict]:
        """Pool map with crash attribution: when a worker dies, the slides then in flight are re-run one at a
        time ("suspects"); only a slide whose solo run kills its worker counts an attempt."""
        pending = collections.deque(slides)
        suspects: collections.deque = collections.deque()
        deaths: collections.Counter = collections.Counter()
        in_flight: dict[Future, tuple[Any, bool]] = {}  # future -> (slide, ran alone)
        if self._pool is None:
            self._pool = self._new_pool()

        def submit(queue: collections.deque, alone: bool) -> bool:
            slide = queue.popleft()
            try:
                fut = self._pool.submit(call_slide, fn, config, slide)
            except BrokenProcessPool:  # a worker died between slides
                queue.appendleft(slide)
                return False
            in_flight[fut] = (slide, alone)
            return True

        try:
            while pending or suspects or in_flight:
                ok = True
                if suspects:
                    if not in_flight:
                        ok = submit(suspects, alone=True)
                else:
                    while ok and pending and len(in_flight) < self.workers:
                        ok = submit(pending, alone=False)
                if not ok and not in_flight:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
                    continue
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                broken = False
                for fut in list(done) + [f for f in in_flight if f not in done]:
                    if fut not in done and not broken:
                        continue  # still running on a healthy pool
                    slide, alone = in_flight.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        if alone:
                            deaths[slide.slide_id] += 1
                            if deaths[slide.slide_id] > self.max_retries:
                                yield worker_died_row(config, slide, deaths[slide.slide_id])
                                continue
                        suspects.append(slide)
                        continue
                    yield raise_config_error(result)
                if broken:
                    self._pool.shutdown(wait=False, cancel_futures=True)
                    self._pool = self._new_pool()
        except BaseException:
            self.close()
            raise

    def describe_models(self, config: Any, stages: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
        # built in this process even with a pool: validates the config and fetches hub weights once, before
        # the workers start; then every pool worker builds its own copy before the first slide
        summary = super().describe_models(config, stages)
        if not self.in_process:
            if self._pool is None:
                self._pool = self._new_pool()
            stages = None if stages is None else list(stages)
            for fut in [self._pool.submit(_build_models, config, stages) for _ in range(self.workers)]:
                fut.result()
        return summary

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
