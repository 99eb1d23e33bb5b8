"""The Ray executor: a pool of slide-worker actors on a Ray cluster (optional extra ``gigapath-core[ray]``).

Each actor builds the models once (on its GPU if ``num_gpus`` > 0; Ray sets ``CUDA_VISIBLE_DEVICES``) and
processes one slide at a time, reading the slide's tiles itself with DataLoader workers (``num_cpus``), so
tile pixels never travel: only the config, the slide path and the small manifest row go through Ray.

* at most ``in_flight_per_worker`` (default 2) slides per actor are submitted at once (``ray.wait``);
* an actor whose process dies (``kill -9``, out of memory, node lost) is restarted by Ray (``max_restarts``)
  and the slides it held are re-run (``max_task_retries``); if Ray gives up, the actor is replaced and those
  slides are re-run one at a time; a slide that still kills its worker alone is recorded as failed
  (``error_type: WorkerDied``);
* a bad slide is a ``failed`` row written by the slide's own worker and is never retried;
* ``address``: ``None`` joins ``$RAY_ADDRESS`` if set, else starts a local single-machine cluster bound to
  127.0.0.1; ``auto`` joins the cluster started on this machine with ``ray start`` / ``ray symmetric-run``.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Iterable, Iterator

from pydantic import Field

from ..errors import ConfigError, GigapathError
from .base import Executor, ExecutorParams, models_summary
from .worker import call_slide, raise_config_error, worker_died_row

log = logging.getLogger("gigapath")

_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local cluster binds every port to 127.0.0.1


def import_ray():
    """Import Ray, or raise ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor.name", "the 'ray' executor needs Ray, which is not installed: "
                                           "pip install 'gigapath-core[ray]' (or pip install 'ray[default]')") from None
    return ray


class SlideWorker:
    """Ray actor body: holds the per-slide function and the config; models are cached in its process."""

    def __init__(self, fn: Callable[..., dict], config: Any, num_cpus: float, num_gpus: float):
        if not num_gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # an actor without a GPU must not grab one
        os.environ.setdefault("GIGAPATH_PROGRESS", "0")
        import torch

        from ..weights import random_weights_said_by_parent

        random_weights_said_by_parent()  # the driver prints each model's weights once (describe_models)

        torch.set_num_threads(max(1, int(num_cpus)))
        self.fn, self.config = fn, config

    def describe(self, stages: list[str] | None = None) -> dict:
        from ..pipeline import get_models

        try:
            return {"models": models_summary(get_models(self.config, stages), stages)}
        except GigapathError as err:
            return {"error": str(err), "config_error": isinstance(err, ConfigError)}

    def process(self, slide: Any) -> dict:
        return call_slide(self.fn, self.config, slide)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor(Executor):
    """Slides on a Ray cluster through a pool of slide-worker actors."""

    name = "ray"

    class Params(ExecutorParams):
        address: str | None = Field(None, description="None = $RAY_ADDRESS, else a new local cluster on 127.0.0.1; "
                                                      "'auto' = the cluster started on this machine; or host:port")
        num_workers: int | None = Field(None, ge=1, description="slide-worker actors (default: as many as fit)")
        num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (torch threads + tile-reading workers)")
        num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (fractions share a GPU)")
        in_flight_per_worker: int = Field(2, ge=1, description="slides submitted per actor at once")
        max_restarts: int = Field(3, ge=0, description="restarts of an actor whose process died")
        max_task_retries: int = Field(3, ge=0, description="re-runs of a slide whose actor died")
        init: dict[str, Any] = Field(default_factory=dict,
                                     description="extra ray.init keyword arguments (e.g. num_cpus, _temp_dir)")

    def __init__(self, address: str | None = None, num_workers: int | None = None, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, in_flight_per_worker: int = 2, max_restarts: int = 3,
                 max_task_retries: int = 3, init: dict | None = None):
        self.address, self.num_workers = address, num_workers
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.in_flight_per_worker = in_flight_per_worker
        self.max_restarts, self.max_task_retries = max_restarts, max_task_retries
        self.init_kwargs = dict(init or {})
        self._started_ray = False
        self._actors: list[Any] = []
        self._generation: list[int] = []
        self._pool_key: Any = None
        self._remote_cls: Any = None
        self.ray = self._connect()

    # ---------------------------------------------------------------------------------- cluster
    def _connect(self):
        local = self.address is None and not os.environ.get("RAY_ADDRESS")
        if local:  # a new single-machine cluster: every port on 127.0.0.1 (read by Ray and its child processes)
            os.environ[_LOOPBACK_ENV] = "0"
        ray = import_ray()
        if ray.is_initialized():
            return ray
        kwargs = {"logging_level": logging.WARNING, "log_to_driver": True, **self.init_kwargs}
        if local:
            kwargs.setdefault("include_dashboard", False)
            try:  # Ray read the variable when first imported; set what it derived from it too
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = False
            except (ImportError, AttributeError):  # pragma: no cover - other Ray versions
                log.warning("could not confine the local Ray cluster to 127.0.0.1")
        try:
            # "local" always starts a new cluster (None would join one found on this machine)
            ray.init(address="local" if local else self.address, **kwargs)
        except ConnectionError as err:
            raise ConfigError("executor.params.address", f"cannot join the Ray cluster at {self.address!r}: {err} "
                                                         "(start it with `ray start --head` or `ray symmetric-run`)") from None
        self._started_ray = True
        return ray

    def _default_workers(self, n_slides: int) -> int:
        res = self.ray.cluster_resources()
        fits = int(res.get("CPU", 1) // self.num_cpus)
        if self.num_gpus:
            if not res.get("GPU"):
                log.warning("executor.params.num_gpus=%s but the Ray cluster has no GPU yet; actors wait for one",
                            self.num_gpus)
            fits = min(fits, int(res.get("GPU", 0) // self.num_gpus))
        return max(1, min(fits, n_slides))

    def _new_actor(self, fn: Callable[..., dict], config: Any):
        if self._remote_cls is None:
            self._remote_cls = self.ray.remote(SlideWorker)
        cls = self._remote_cls.options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                   max_restarts=self.max_restarts,
                                                   max_task_retries=self.max_task_retries)
        return cls.remote(fn, config, self.num_cpus, self.num_gpus)

    def _ensure_pool(self, fn: Callable[..., dict], config: Any, n_slides: int) -> None:
        key = (fn, config.model_dump_json() if hasattr(config, "model_dump_json") else repr(config))
        if self._actors and self._pool_key == key:
            return
        self._kill_actors()
        n = self.num_workers or self._default_workers(n_slides)
        self._actors = [self._new_actor(fn, config) for _ in range(n)]
        self._generation = [0] * n
        self._pool_key = key

    def worker_pids(self) -> list[int]:
        """Process ids of the live actors (for tests and diagnostics)."""
        return self.ray.get([a.pid.remote() for a in self._actors])

    # -------------------------------------------------------------------------------------- map
    def describe_models(self, config: Any, stages: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
        from ..pipeline import process_slide

        self._ensure_pool(process_slide, config, n_slides=1 << 30)
        info = self.ray.get(self._actors[0].describe.remote(None if stages is None else list(stages)))
        if "error" in info:
            raise (ConfigError("", info["error"]) if info["config_error"] else GigapathError(info["error"]))
        return [tuple(r) for r in info["models"]]

    def check_device(self, config: Any) -> None:
        """Nothing to check here: the device is the actors' (whose GPUs this process may lack), checked when
        they build a model."""

    def map(self, fn: Callable[..., dict], config: Any, slides: list, **kwargs: Any) -> Iterator[dict]:
        """Slides over the actor pool; see the module docstring. When Ray gives up on an actor, the slides it
        held are re-run one at a time on fresh actors, so only the slide that kills its worker on its own is
        recorded as ``WorkerDied`` (a slide merely queued behind it is not blamed)."""
        from ray.exceptions import ActorUnschedulableError, RayError, RayTaskError

        if not slides:
            return
        self._ensure_pool(fn, config, len(slides))
        n = len(self._actors)
        pending, suspects = collections.deque(slides), collections.deque()
        busy: list[set] = [set() for _ in range(n)]  # in-flight refs of each actor's current generation
        solo = [False] * n  # actor is running a suspect alone
        refs: dict[Any, tuple[Any, int, int, bool]] = {}  # ref -> (slide, actor, generation, alone)

        def submit(i: int, slide: Any, alone: bool) -> None:
            ref = self._actors[i].process.remote(slide)
            refs[ref] = (slide, i, self._generation[i], alone)
            busy[i].add(ref)
            solo[i] = alone

        while pending or suspects or refs:
            for i in range(n):  # a suspect needs an idle actor to itself
                if suspects and not busy[i]:
                    submit(i, suspects.popleft(), alone=True)
            while pending:
                open_ = [i for i in range(n) if not solo[i] and len(busy[i]) < self.in_flight_per_worker]
                if not open_:
                    break
                submit(min(open_, key=lambda k: len(busy[k])), pending.popleft(), alone=False)
            ready, _ = self.ray.wait(list(refs), num_returns=1)
            for ref in ready:
                slide, i, gen, alone = refs.pop(ref)
                busy[i].discard(ref)
                if not busy[i]:
                    solo[i] = False
                try:
                    row = self.ray.get(ref)
                except RayTaskError as err:  # an exception escaped the worker wrapper: fail this slide only
                    row = {"slide_id": slide.slide_id, "slide_path": slide.path, "status": "failed",
                           "reason": f"{slide.path}: {type(err.cause).__name__}: {err.cause}",
                           "error_type": type(err.cause).__name__}
                except ActorUnschedulableError as err:
                    raise ConfigError("executor.params", f"the Ray cluster cannot place a slide worker "
                                                         f"(num_cpus={self.num_cpus}, num_gpus={self.num_gpus}): {err}") from None
                except RayError as err:  # the actor died for good (Ray's restarts/retries are spent)
                    if gen == self._generation[i]:  # replace it once; its other refs fail the same way
                        self.ray.kill(self._actors[i], no_restart=True)
                        self._actors[i] = self._new_actor(fn, config)
                        self._generation[i] += 1
                        busy[i], solo[i] = set(), False
                    if alone:
                        row = worker_died_row(config, slide, 1 + self.max_task_retries, type(err).__name__)
                    else:
                        log.warning("slide %s: worker lost (%s); re-running it alone on a new worker",
                                    slide.slide_id, type(err).__name__)
                        suspects.append(slide)
                        continue
                yield raise_config_error(row)

    # ------------------------------------------------------------------------------------ close
    def _kill_actors(self) -> None:
        for a in self._actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self._actors, self._generation = [], []

    def close(self) -> None:
        self._kill_actors()
        if self._started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self._started_ray = False
