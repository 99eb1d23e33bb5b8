"""Helpers of the fault and hostile-input suite (tests/test_faults.py, tests/test_hostile_configs.py).

Every fault test asserts the exact status and message, that nothing outside the output folder changed
(:func:`tree` of the parent folder before and after) and that finished work is not redone (:func:`stamps`).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
SLIDE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"
GIGAPATH = Path(sys.executable).with_name("gigapath")


def tiler_only(*slides: str, **extra) -> dict:
    """The smallest embed config: tiling only (about 2 s per copy of the bundled slide)."""
    return {"inputs": {"slides": [str(s) for s in slides]}, "readers": ["openslide"], "device": "cpu", **extra}


def copy_slide(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SLIDE, dst)
    return dst


def tree(folder: Path, exclude: Path | None = None) -> dict[str, tuple]:
    """Everything under ``folder`` (not following symlinks), except ``exclude`` and what is below it:
    ``relative path -> (kind, size, mtime_ns, inode)``."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        d = Path(dirpath)
        if exclude is not None and (d == exclude or exclude in d.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if exclude is not None and p == exclude:
                continue
            st = p.lstat()
            kind = "link" if p.is_symlink() else "dir" if p.is_dir() else "file"
            snap[str(p.relative_to(folder))] = (kind, None if kind == "dir" else st.st_size, st.st_mtime_ns, st.st_ino)
    return snap


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """``name -> (mtime_ns, inode)`` of the files in a slide folder: unchanged = not redone."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir()) if p.is_file()}


def manifest(out: Path, name: str = "manifest.csv") -> dict[str, dict]:
    with open(out / name, newline="", encoding="utf-8") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML "billion laughs" document: ``width ** levels`` scalars once every alias is expanded, all under
    ``tile_encoder.batch_size`` (so that, without a budget, validation would print it)."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return ("inputs: {slides: [x.svs]}\ntile_encoder:\n  name: dinov2_vit\n  batch_size:\n    "
            + "\n    ".join(lines) + "\n")


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    return subprocess.run([str(GIGAPATH), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_cli_rusage(*args: str, timeout: float = 60) -> tuple[int, str, int]:
    """Run the CLI; return ``(exit code, stderr, peak RSS of that one process in KiB)``. The peak is the CLI
    process's own ``VmHWM`` (read from /proc at exit: reset by exec, unlike ``ru_maxrss``, which a child inherits
    from the large test process it was forked from). Killed after ``timeout`` seconds (exit code -9)."""
    import sys
    import tempfile

    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    with tempfile.TemporaryDirectory() as tmp:
        status_file = Path(tmp) / "status"
        code = ("import atexit, pathlib, sys\n"
                "from gigapath_core.cli import main\n"
                f"atexit.register(lambda: pathlib.Path({str(status_file)!r}).write_text("
                "pathlib.Path('/proc/self/status').read_text()))\n"
                "sys.exit(main(sys.argv[1:]))\n")
        try:
            proc = subprocess.run([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=env, timeout=timeout)
            rc, stderr = proc.returncode, proc.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired as err:
            rc, stderr = -9, (err.stderr or b"").decode(errors="replace")
        peak = 0
        if status_file.is_file():
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1])
        return rc, stderr, peak


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "2m") -> Iterator[Path]:
    """A ``size`` tmpfs mounted at ``where`` (root only; the caller skips otherwise); always unmounted."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                   capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def can_mount_tmpfs(tmp: Path) -> str | None:
    """None if this process can mount a tmpfs, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs (CI runs as root)"
    if not shutil.which("mount"):
        return "no mount command"
    probe = tmp / "tmpfs-probe"
    try:
        with small_tmpfs(probe, "64k"):
            pass
    except subprocess.CalledProcessError as err:
        return f"mount -t tmpfs failed: {err.stderr.decode(errors='replace').strip()}"
    return None


def fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` until about ``leave`` bytes are free; returns the filler file."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
        except OSError:
            pass
    return filler
