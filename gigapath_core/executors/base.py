"""Executor interface and lookup.

An executor maps the per-slide unit of work ``fn(config, slide) -> row`` (normally
:func:`gigapath_core.pipeline.process_slide`) over slides and yields the manifest rows as slides finish.
Only the config, the slide (a path and an id) and the small row travel between processes; every slide's
pixels are read where it is processed.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Callable, ClassVar, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ConfigError

#: executor name -> "module:Class" (imported lazily so optional engines cost nothing until used)
EXECUTORS: dict[str, str] = {
    "local": "gigapath_core.executors.local:LocalExecutor",
    "ray": "gigapath_core.executors.ray:RayExecutor",
}


class ExecutorParams(BaseModel):
    """Base of every executor's ``Params`` (``executor.params`` in a config); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Executor(abc.ABC):
    """Maps ``fn(config, slide, **kwargs) -> row`` over slides; yields rows as slides finish (any order).

    Contract (tested for every executor in ``tests/test_executors.py``):

    * one row per slide; a slide's own failure is a row with ``status: failed``, never an exception;
    * a :class:`~gigapath_core.errors.ConfigError` (affects every slide) is raised in the caller;
    * a worker that dies (``kill -9``, out of memory) is replaced and its slide retried; a slide that
      kills its worker every time is recorded as failed (``error_type: WorkerDied``);
    * ``close()`` releases every worker.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[ExecutorParams]] = ExecutorParams
    #: True when ``fn`` runs in the calling process (progress callbacks work, models are shared with it)
    in_process: bool = False

    @abc.abstractmethod
    def map(self, fn: Callable[..., dict], config: Any, slides: list, **kwargs: Any) -> Iterator[dict]:
        """Yield one manifest row per slide. ``kwargs`` (e.g. ``on_tiles``) reach ``fn`` only in-process."""

    def describe_models(self, config: Any, stages: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
        """Build the models where slides will run; return ``(label, plugin name, weights source)`` rows.

        Args:
            stages: the model stages to build (:data:`gigapath_core.pipeline.MODEL_STAGES`; None = every one
                the config has). A stage left out is built where a slide first needs it.
        Raises ConfigError before any slide is touched (bad params, tile/slide encoder width mismatch).
        """
        from ..pipeline import get_models

        return models_summary(get_models(config, stages), stages)

    def check_device(self, config: Any) -> None:
        """Raise ConfigError if ``config.device`` cannot be used where slides run, without building a model
        (a run with nothing to do builds none). Default: checked in this process."""
        from ..pipeline import resolve_device

        resolve_device(config.device)

    def close(self) -> None:
        """Release workers."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def models_summary(models, stages: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
    """``Models`` -> ``[(label, plugin name, weights source)]`` for the encoders of ``stages`` (None: all) that
    are built."""
    rows = []
    for stage in ("tile_encoder", "slide_encoder"):
        m = getattr(models, stage)
        label = stage.replace("_", " ")
        if m is not None and (stages is None or stage in stages):
            rows.append((label, type(m).name, m.weights_source))
    return rows


def map_until_done(executor: Executor, fn: Callable[..., dict], config: Any, slides: list, *,
                   poll_s: float = 2.0, on_wait: Callable[[list], None] | None = None,
                   **kwargs: Any) -> Iterator[dict]:
    """``executor.map`` until no slide is ``locked`` (being processed by another run on the same folder).

    Locked slides are offered again every ``poll_s`` seconds: once the other run finishes one, it comes back
    ``skipped``; if the other run died, its lock turns stale and this run processes the slide.
    ``on_wait(slide_ids)`` is called before each wait.
    """
    import time

    todo = list(slides)
    while todo:
        locked = []
        for row in executor.map(fn, config, todo, **kwargs):
            if row.get("status") == "locked":
                locked.append(row["slide_id"])
            else:
                yield row
        if not locked:
            return
        if on_wait:
            on_wait(locked)
        time.sleep(poll_s)
        ids = set(locked)
        todo = [s for s in todo if s.slide_id in ids]


def get_executor(name: str, **params: Any) -> Executor:
    """Instantiate executor ``name`` with validated ``params``.

    Raises:
        ConfigError: unknown name (lists the valid ones), an invalid parameter (``executor.params.<key>``),
            or an optional engine that is not installed (says which extra to install).
    """
    if name not in EXECUTORS:
        raise ConfigError("executor.name", f"unknown executor {name!r}; valid choices: {', '.join(EXECUTORS)}")
    module, cls_name = EXECUTORS[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    try:
        validated = cls.Params(**params)
    except ValidationError as err:
        from ..config import pydantic_errors

        raise pydantic_errors(err, prefix="executor.params", model=cls.Params) from None
    return cls(**validated.model_dump())
