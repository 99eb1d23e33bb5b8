"""Output contract: atomic writers for h5/PNG/JSON, per-slide status markers, and ``manifest.csv``.

Layout of a run's output folder::

    OUT/manifest.csv                 one row per slide (rebuilt from markers, never half-written)
    OUT/<slide_id>/tiles.h5          coords (N,2) int64 level-0 px; grid_coords (N,2) int64 0.5-µm px; occupancy
    OUT/<slide_id>/tile_embeddings.h5 features (N,D) float32; coords (N,2) int64 level-0 px; grid_coords (N,2)
    OUT/<slide_id>/slide_embedding.h5 embedding (D,) float32 (or (L,D) for all layers)
    OUT/<slide_id>/thumbnail.png     tissue mask outline + kept tiles
    OUT/<slide_id>/tissue.geojson    tissue contours in level-0 px (opens in QuPath)
    OUT/<slide_id>/status.json       marker written last: {"status": "ok"|"failed", ...}; an ``ok`` marker also
                                     records the slide file's identity and the outputs it vouches for
                                     (gigapath_core/markers.py)

Every h5 file carries the root attribute ``format_version`` = 2 (the coordinate contract, ``docs/formats.md``).
Every file is written to a temporary name in the same folder, then renamed (``os.replace``), so a crash
never leaves a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

STATUS_FILE = "status.json"
TMP_PREFIX = ".gigapath-tmp-"  # temporary names (see atomic_path); left behind only by a killed writer
_UMASK = os.umask(0)
os.umask(_UMASK)
#: ``status`` .. ``seconds_total``: the slide's last real result (from the run that processed it: a re-run that
#: skips a finished slide keeps them); ``this_run``: what the run that wrote the manifest did with the slide,
#: ``processed`` | ``skipped`` (finished by an earlier run) | ``failed`` | ``locked`` (another live run holds it),
#: empty for a slide this run did not reach (another shard, a stopped run)
MANIFEST_FIELDS = ["slide_id", "slide_path", "status", "reason", "error_type", "n_tiles", "reader",
                   "weights", "seconds_tiling", "seconds_tile_encoder", "seconds_slide_encoder", "seconds_total",
                   "this_run"]


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success rename it to ``final``, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _attr(v: Any) -> Any:
    if v is None:
        return "none"
    if isinstance(v, (dict, list, tuple)) and not (isinstance(v, tuple) and all(isinstance(x, (int, float)) for x in v)):
        return json.dumps(v, default=_json_default)
    if isinstance(v, Path):
        return str(v)
    return v


def write_h5(path: str | Path, datasets: dict[str, np.ndarray], attrs: dict[str, Any] | None = None,
             dataset_attrs: dict[str, dict[str, Any]] | None = None) -> None:
    """Write datasets and attributes to an HDF5 file atomically. ``None`` attrs are stored as "none".

    Every file gets the root attribute ``format_version`` (:data:`gigapath_core.interop.FORMAT_VERSION`, the
    coordinate contract of ``docs/formats.md``) unless ``attrs`` sets it.

    Args:
        attrs: root (file) attributes.
        dataset_attrs: dataset name -> attributes of that dataset (e.g. the ``coords`` attributes that
            TRIDENT and CLAM read, :func:`gigapath_core.interop.coords_attrs`).
    """
    import h5py

    from .interop.contract import FORMAT_VERSION

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, arr in datasets.items():
                f.create_dataset(name, data=np.asarray(arr))
            for name, dattrs in (dataset_attrs or {}).items():
                for k, v in dattrs.items():
                    f[name].attrs[k] = _attr(v)
            f.attrs["format_version"] = FORMAT_VERSION
            for k, v in (attrs or {}).items():
                f.attrs[k] = _attr(v)


def read_h5(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read every dataset and attribute of an HDF5 file into memory."""
    import h5py

    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys()}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return data, attrs


def read_h5_all(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, Any]]]:
    """:func:`read_h5` and :func:`read_dataset_attrs` with the file opened once: ``(datasets, root attributes,
    dataset name -> its attributes)``, bytes decoded."""
    import h5py

    def text(v: Any) -> Any:
        return v.decode() if isinstance(v, bytes) else v

    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys()}
        attrs = {k: text(v) for k, v in f.attrs.items()}
        dattrs = {k: {a: text(v) for a, v in f[k].attrs.items()} for k in f.keys()}
    return data, attrs, dattrs


def read_h5_attrs(path: str | Path) -> dict[str, Any]:
    """The root attributes of an HDF5 file (bytes decoded), without reading its datasets."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def read_dataset_attrs(path: str | Path) -> dict[str, dict[str, Any]]:
    """Dataset name -> its attributes (bytes decoded), for every dataset of an HDF5 file."""
    import h5py

    with h5py.File(path, "r") as f:
        return {k: {a: (v.decode() if isinstance(v, bytes) else v) for a, v in f[k].attrs.items()} for k in f.keys()}


def write_png(path: str | Path, image: np.ndarray, compress_level: int = 6) -> None:
    """Atomically write (h, w[, c]) uint8 ``image`` as PNG; ``compress_level`` 0-9 (zlib; lossless at any level,
    1 is ~2x faster to write than PIL's default 6 for ~5% more bytes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------ markers, manifest
def read_status(slide_dir: str | Path) -> dict[str, Any] | None:
    p = Path(slide_dir) / STATUS_FILE
    if not p.is_file():
        return None
    try:
        status = json.loads(p.read_text())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON: no marker
        return None
    return status if isinstance(status, dict) else None


def is_done(slide_dir: str | Path) -> bool:
    s = read_status(slide_dir)
    return bool(s and s.get("status") == "ok")


def write_status(slide_dir: str | Path, row: dict[str, Any]) -> None:
    write_json(Path(slide_dir) / STATUS_FILE, row)


def rebuild_manifest(out_dir: str | Path, slide_ids: list[str] | None = None,
                     overlay: dict[str, dict[str, Any]] | None = None,
                     name: str = "manifest.csv") -> list[dict[str, Any]]:
    """Rebuild ``OUT/manifest.csv`` (or ``OUT/<name>``) from the per-slide markers; return the rows.

    Args:
        slide_ids: the slides of this run, in input order; ``None`` takes every slide folder with a marker.
        overlay: this run's rows (with ``this_run``), which replace the marker's; a row read from a marker gets
            an empty ``this_run`` (the slide was not reached by this run).
    """
    overlay = overlay or {}
    out_dir = Path(out_dir)
    if slide_ids is None:
        slide_ids = sorted(p.parent.name for p in out_dir.glob(f"*/{STATUS_FILE}"))
    rows = []
    for sid in slide_ids:
        s = overlay.get(sid) or {**(read_status(out_dir / sid) or {"slide_id": sid, "status": "pending",
                                                                      "reason": "not processed yet"}), "this_run": ""}
        rows.append({k: s.get(k, "") for k in MANIFEST_FIELDS})
    write_manifest(out_dir, rows, name)
    return rows


def write_manifest(out_dir: str | Path, rows: list[dict[str, Any]], name: str = "manifest.csv") -> None:
    """Write manifest rows (columns :data:`MANIFEST_FIELDS`) atomically to ``OUT/<name>``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows({k: r.get(k, "") for k in MANIFEST_FIELDS} for r in rows)
    write_bytes(Path(out_dir) / name, buf.getvalue().encode())
