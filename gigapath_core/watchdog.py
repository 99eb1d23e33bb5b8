"""Watchdogs: no stage waits forever without saying so, and no worker process outlives the run that started it.

* :class:`Watchdog` — a stage calls :meth:`Watchdog.beat` on progress; after ``limit_s`` seconds without one,
  a WARNING names the stage, what it waits for and where the waiting thread is (its innermost frames), and
  repeats every ``limit_s``. It only reports: a thread blocked in native code cannot be interrupted safely.
  The hard limits are where a wait can be abandoned: DataLoader worker batches
  (``tile_encoder.batch_timeout_s``, :func:`gigapath_core.stages.tile_embedding.embed_tiles`).
* :func:`exit_with_parent` — called in a pool worker process: the worker ends when the process that started it
  dies, even by ``kill -9`` (otherwise an idle pool worker waits on its task queue forever, holding its models:
  issue #11, 1.4 GB each). Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; everywhere: a thread that checks the
  parent pid every ``poll_s`` seconds (the ``ManagerWatchdog`` of ``torch/utils/data/_utils/worker.py`` does
  the same for DataLoader workers).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback

log = logging.getLogger("gigapath")


class Watchdog:
    """Warns when ``beat()`` has not been called for ``limit_s`` seconds (then again every ``limit_s``).

    Args:
        what: the stage and its subject, e.g. ``"tile embedding of /data/a.svs"``.
        limit_s: seconds without progress before the first warning (> 0).
        waiting_for: what the stage is waiting for (shown in the warning).

    Use as a context manager; the thread that enters it is the one whose stack is reported.
    """

    def __init__(self, what: str, limit_s: float, waiting_for: str = ""):
        if not limit_s > 0:
            raise ValueError(f"limit_s must be > 0, got {limit_s}")
        self.what, self.limit_s, self.waiting_for = what, float(limit_s), waiting_for
        self.stalls = 0  # warnings given
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._watched: int | None = None
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Record progress."""
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        self._watched = threading.get_ident()
        self.beat()
        self._thread = threading.Thread(target=self._run, name="gigapath-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.limit_s / 4)):
            idle = time.monotonic() - self._last
            if idle >= self.limit_s * (self.stalls + 1):
                self.stalls += 1
                log.warning("%s: no progress for %.0f s%s; still waiting (at %s)", self.what, idle,
                            f" ({self.waiting_for})" if self.waiting_for else "", self._where())

    def _where(self) -> str:
        frame = sys._current_frames().get(self._watched)
        if frame is None:
            return "?"
        stack = traceback.extract_stack(frame)[-3:]
        return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack))


# ------------------------------------------------------------------------------------ parent death
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int, poll_s: float = 1.0, pdeathsig: bool = True) -> None:
    """Make this process end (SIGKILL, as if killed with its parent) once ``parent_pid`` is gone.

    Call it first thing in a worker process (a pool initializer). Linux delivers SIGKILL at once through
    ``PR_SET_PDEATHSIG`` (it fires when the *thread* that started the worker ends; the pool starts its workers
    from the thread running the executor, which lives as long as the run); the polling thread covers other
    platforms and a parent that died before this call. Exiting like a ``kill -9`` is safe: every output is
    written atomically and a dead process's slide lock is taken over by the next run.

    Args:
        parent_pid: the pid of the process that started this one (``os.getpid()`` there).
        poll_s: period of the polling thread (s).
        pdeathsig: use ``PR_SET_PDEATHSIG`` where available (False: the polling thread only).
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no libc prctl: the thread below still works
            pass
    if os.getppid() != parent_pid:  # the parent died before the prctl above took effect
        os.kill(os.getpid(), signal.SIGKILL)

    def poll() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent_pid:  # re-parented: the process that started us is gone
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=poll, name="gigapath-parent-watch", daemon=True).start()
