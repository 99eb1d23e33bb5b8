"""How DataLoader workers that read slides are started: ``fork`` when every reader involved is fork-safe,
``forkserver`` otherwise.

``fork`` copies the parent, including the runtime state of the slide libraries it has used. libvips keeps a
set of worker threads; a forked child inherits the bookkeeping but not the threads, so its first pixel read
waits forever (issue #11: a PNG slide read with ``readers: [pyvips]`` and ``num_workers: 1`` hung in
``write_to_memory``). A reader declares this with ``fork_safe = False``
(:attr:`gigapath_core.kinds.SlideReader.fork_safe`); its workers are then forked from a *forkserver*: a clean
process started once per parent process that has imported torch, gigapath and every plugin
(:mod:`gigapath_core.stages._forkserver_preload`) but has never decoded a pixel.

Time to the first batch of a DataLoader with 2 workers (``benchmarks/worker_start.py``, results in
``benchmarks/results/worker_start.json``; 2 shared CPU cores): fork 0.2-0.3 s; forkserver with the preload
below 0.4 s, after a one-time server start of ~7 s; forkserver without it 13-19 s (every worker imports
torchvision and the plugins); spawn 18-20 s. Hence fork stays the method for fork-safe readers (openslide,
tifffile, tiatoolbox) and pyvips pays the forkserver's small cost.

Where the platform's default start method is not ``fork`` (macOS, Windows, Python >= 3.14 on Linux), the
default is used: it never copies a parent's library state.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterable
from multiprocessing.context import BaseContext

#: imported once by the forkserver process, so every worker it forks starts with these modules loaded
FORKSERVER_PRELOAD = ["gigapath_core.stages._forkserver_preload"]


def reader_fork_safe(name: str) -> bool:
    """Whether slide reader plugin ``name`` may be used in a forked child of a process that has used it
    (its class attribute ``fork_safe``; an unknown name counts as not fork-safe)."""
    from ..errors import PluginNotFoundError
    from ..plugins import get_plugin_manager

    try:
        cls = get_plugin_manager().get("slide_reader", name).cls
    except PluginNotFoundError:
        return False
    return bool(getattr(cls, "fork_safe", True))


def start_method(readers: Iterable[str]) -> str:
    """``fork`` | ``forkserver`` | the platform default: how to start workers that read with ``readers``."""
    default = multiprocessing.get_start_method(allow_none=False)
    if default != "fork":
        return default
    return "fork" if all(reader_fork_safe(r) for r in readers) else "forkserver"


def loader_context(readers: Iterable[str]) -> BaseContext | None:
    """The ``multiprocessing_context`` for a DataLoader whose workers read slides with ``readers``
    (None = the default context). Sets the forkserver preload when the forkserver is chosen."""
    method = start_method(readers)
    if method == multiprocessing.get_start_method(allow_none=False):
        return None
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)  # takes effect when this process first starts the server
    return ctx
