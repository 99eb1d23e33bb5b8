"""Per-slide lock file, so two runs (or two workers) never process the same slide folder at once.

The lock is ``OUT/<slide_id>/.gigapath.lock``, created with ``O_CREAT | O_EXCL`` (atomic on local disks and
on NFSv3+), holding JSON ``{host, pid, pid_start, boot_id, pid_ns, token, created}``. While held, a daemon
thread refreshes its modification time every ``heartbeat`` seconds.

A lock is *stale* (its holder is gone, e.g. after ``kill -9`` or a node failure) when

* it was written on this machine, in this pid namespace and since the last boot, and the process
  ``pid`` with start time ``pid_start`` no longer exists (checked at once); or
* it was written elsewhere and its heartbeat is older than ``stale_after`` seconds.

Breaking a stale lock is serialised by a second, short-lived ``O_EXCL`` guard file and re-checks that the
lock still holds the same token, so two runs that both find the same stale lock cannot both take it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

LOCK_FILE = ".gigapath.lock"
_GUARD_SUFFIX = ".break"
_GUARD_STALE_S = 30.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _proc_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), or None where unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 overall; fields after "(comm)" start at 3


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def identity() -> dict[str, Any]:
    """Who we are, as written into a lock file."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_start(pid), "boot_id": _boot_id(),
            "pid_ns": _pid_ns()}


def is_stale(info: dict[str, Any], mtime: float, stale_after: float, now: float | None = None) -> bool:
    """Whether the holder described by lock contents ``info`` (last heartbeat ``mtime``) is gone."""
    me = identity()
    same_machine = (info.get("host") == me["host"] and info.get("boot_id") == me["boot_id"]
                    and info.get("pid_ns") == me["pid_ns"] and me["boot_id"] != "")
    if same_machine:
        pid = int(info.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid):
            return True
        start = _proc_start(pid)
        return info.get("pid_start") is not None and start is not None and start != info["pid_start"]
    if info.get("host") == me["host"] and info.get("boot_id") and info.get("boot_id") != me["boot_id"]:
        return True  # written on this host before its last reboot
    return ((now or time.time()) - mtime) > stale_after


class SlideLock:
    """Non-blocking lock on one slide folder (see the module docstring).

    Args:
        slide_dir: the slide's output folder (created if missing).
        stale_after: seconds without a heartbeat after which a lock from another machine is stale.
        heartbeat: seconds between heartbeats while held.

    Use ``acquire()`` (returns False if a live holder has it; ``holder`` then says who) and ``release()``,
    or ``with SlideLock(d) as ok:``.
    """

    def __init__(self, slide_dir: str | Path, stale_after: float = 600.0, heartbeat: float = 60.0):
        self.path = Path(slide_dir) / LOCK_FILE
        self.stale_after, self.heartbeat = float(stale_after), float(heartbeat)
        self.token = uuid.uuid4().hex
        self.holder: dict[str, Any] | None = None
        self.broke_stale: dict[str, Any] | None = None  # the stale holder we replaced, if any
        self._held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------ acquire
    def _create(self) -> bool:
        content = json.dumps({**identity(), "token": self.token, "created": time.time()})
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        return True

    def _break_if_stale(self) -> bool:
        """Remove the lock if its holder is gone. Returns True if the caller should try to create it again."""
        raw = _read(self.path)
        if raw is None:
            return True
        try:
            info = json.loads(raw)
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        except (ValueError, OSError):
            # unreadable or half-written (a holder killed between create and write): judge by age alone
            info, mtime = {}, self._mtime()
        if info and not is_stale(info, mtime, self.stale_after):
            self.holder = info
            return False
        if not info and time.time() - mtime <= _GUARD_STALE_S:
            self.holder = {"host": "?", "pid": "?", "note": "lock file being written"}
            return False
        guard = self.path.with_name(self.path.name + _GUARD_SUFFIX)
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                    guard.unlink(missing_ok=True)  # a breaker died while holding the guard
            except FileNotFoundError:
                pass
            self.holder = info or {"host": "?", "pid": "?"}
            return False
        try:
            if _read(self.path) == raw:  # still the same stale lock: nobody replaced it meanwhile
                self.path.unlink(missing_ok=True)
                self.broke_stale = info
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def acquire(self) -> bool:
        """Take the lock if it is free or stale. Never blocks on a live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._held, self.holder = True, None
                self._start_heartbeat()
                return True
            if not self._break_if_stale():
                return False
        return False

    # ---------------------------------------------------------------------------------- heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"gigapath-lock-{self.path.parent.name}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self.owned():
                return
            try:
                os.utime(self.path)
            except OSError:
                return

    def owned(self) -> bool:
        """Whether the lock file on disk is still ours (False if another run broke it as stale)."""
        raw = _read(self.path)
        try:
            return bool(raw) and json.loads(raw).get("token") == self.token
        except ValueError:
            return False

    # ------------------------------------------------------------------------------------ release
    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def describe_holder(self) -> str:
        h = self.holder or {}
        return f"host {h.get('host', '?')} pid {h.get('pid', '?')}"
