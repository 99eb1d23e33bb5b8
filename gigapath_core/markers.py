"""What a completion marker vouches for, so "done" stays honest: the slide file it was made from and the outputs.

A slide's ``status.json`` with ``status: ok`` records

* ``input``: the slide file's identity when it was processed, ``{"size", "mtime_ns", "sha256"}``, where
  ``sha256`` hashes the size and the first and last :data:`HASH_BYTES` bytes (cheap on any slide size, and a
  re-scanned or re-exported slide differs in its header); and
* ``outputs``: ``{file name: size in bytes}`` of the slide folder's files (top level, not hidden, not the
  marker itself).

A later run skips the slide only if the marker's config fingerprint, the slide file's identity (all three
fields) and every recorded output (present, same size) still match; otherwise it redoes the slide and says why
(:func:`stale_reason`, e.g. ``redone: slide file changed since the last run (size 123 -> 456 bytes)``). This is
the check ``make`` and ``rsync`` make (size + mtime), plus a content hash: copying slides without keeping
their modification times (``cp`` without ``-p``; ``rsync -a`` and ``cp -p`` keep them) therefore redoes them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

HASH_BYTES = 1 << 20  # 1 MiB from each end


def input_identity(path: str | Path) -> dict[str, Any]:
    """``{"size", "mtime_ns", "sha256"}`` of a slide file (follows symlinks).

    Raises:
        OSError: the file cannot be opened or read (missing, a symlink loop, permissions).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        h.update(str(st.st_size).encode() + b"\0")
        h.update(f.read(HASH_BYTES))
        if st.st_size > HASH_BYTES:
            f.seek(max(HASH_BYTES, st.st_size - HASH_BYTES))
            h.update(f.read(HASH_BYTES))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def identity_key(identity: dict[str, Any]) -> str:
    """One string for a config fingerprint: outputs made from another version of the file are not reused."""
    return f"{identity['size']}:{identity['mtime_ns']}:{identity['sha256']}"


def outputs_record(slide_dir: str | Path, marker_name: str) -> dict[str, int]:
    """``{name: size}`` of the slide folder's top-level, non-hidden regular files, except ``marker_name``."""
    rec = {}
    for p in sorted(Path(slide_dir).iterdir()):
        if p.name != marker_name and not p.name.startswith(".") and p.is_file() and not p.is_symlink():
            rec[p.name] = p.stat().st_size
    return rec


def stale_reason(marker: dict[str, Any], identity: dict[str, Any], slide_dir: str | Path) -> str | None:
    """Why an ``ok`` marker no longer vouches for the slide (the ``redone: ...`` reason), or None if it does."""
    rec = marker.get("input")
    if not isinstance(rec, dict) or not isinstance(marker.get("outputs"), dict):
        return "redone: the earlier marker records no slide file identity or outputs (written by an older gigapath)"
    if rec.get("size") != identity["size"]:
        return f"redone: slide file changed since the last run (size {rec.get('size')} -> {identity['size']} bytes)"
    if rec.get("sha256") != identity["sha256"]:
        return "redone: slide file changed since the last run (its first/last MiB differ)"
    if rec.get("mtime_ns") != identity["mtime_ns"]:
        return "redone: slide file changed since the last run (modification time differs)"
    for name, size in marker["outputs"].items():
        p = Path(slide_dir) / name
        try:
            now = p.stat().st_size if p.is_file() else None
        except OSError:
            now = None
        if now is None:
            return f"redone: output {name} is missing since the last run"
        if now != size:
            return f"redone: output {name} changed size since the last run ({size} -> {now} bytes)"
    return None
