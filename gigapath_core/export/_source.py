"""Read one finished slide folder of a run (``OUT/<slide_id>/``) into one in-memory record for the exporters.

Reads both layouts of ``tile_embeddings.h5`` (docs/formats.md):

- format_version 2: ``coords`` (N, 2) int64 level-0 px, ``grid_coords`` (N, 2) int64 grid px at ``target_mpp``;
- version 1 (no ``format_version`` attribute): ``coords`` = grid px, ``coords_level0`` = level-0 px.

The level-0 mpp and the read geometry (``level``, ``read_size``, ``level_dimensions``) come from ``tiles.h5``'s
root attributes (``source_mpp_x``/``source_mpp_y``), else from attributes on the ``coords`` dataset or the root of
``tile_embeddings.h5`` (``level0_mpp``).

A slide of an embed run on existing features (``inputs.features``; ``status.json`` ``reader`` = ``features:<fmt>``)
has no ``tile_embeddings.h5``: its tiles are read back from the feature file named in ``status.json``
``slide_path`` with the importer (``gigapath_core.interop.read_tile_features``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GigapathError, SlideError
from ..store import read_status

EMBEDDINGS_FILE = "tile_embeddings.h5"
TILES_FILE = "tiles.h5"
SLIDE_FILE = "slide_embedding.h5"

#: Magnification convention shared with TRIDENT (trident/wsi_objects/WSIPatcher.py: ``pixel_size = 10 / mag``).
MAG_TIMES_MPP = 10.0


@dataclass
class SlideFeatures:
    """Tile features of one slide with both coordinate systems and the units needed to convert them.

    Attributes:
        slide_id: folder name in the run.
        features: (N, D) float32 tile embeddings.
        coords: (N, 2) int64 level-0 px of each tile's top-left corner (x, y), or None when the run has no
            level-0 coordinates for this slide (foreign features given in grid px only).
        grid_coords: (N, 2) int64 px at ``target_mpp``, multiples of ``tile_size``.
        level0_mpp: (x, y) µm/px of level 0, or None when unknown.
        tile_size: tile side in px at ``target_mpp`` (256).
        target_mpp: µm/px of the grid (0.5).
        tile_encoder: our tile-encoder plugin name; ``weights_source`` where its weights came from.
        level, read_size: pyramid level read and the square size read there (CLAM's ``patch_level``/``patch_size``).
        level_dimensions: (width, height) of each level, level 0 first, or empty when unknown.
        slide_path: the slide file the run read.
        slide_embedding: (D,) or (L, D) float32 from ``slide_embedding.h5``, or None; ``slide_encoder`` and
            ``slide_encoder_weights`` name the plugin and its weights source.
        attrs: root attributes of ``tile_embeddings.h5``.
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray | None
    grid_coords: np.ndarray
    level0_mpp: tuple[float, float] | None
    tile_size: int
    target_mpp: float
    tile_encoder: str
    weights_source: str
    level: int
    read_size: int | None
    level_dimensions: list[list[int]]
    slide_path: str
    slide_embedding: np.ndarray | None = None
    slide_encoder: str = ""
    slide_encoder_weights: str = ""
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def tile_size_level0(self) -> float:
        """Side of one tile in level-0 px (x axis): ``tile_size * target_mpp / level0_mpp[0]`` (563.6 at 0.2271)."""
        return self.tile_size * self.target_mpp / self.need_mpp()[0]

    @property
    def level0_magnification(self) -> float:
        """Level-0 magnification ``10 / mpp`` (0.25 µm/px = 40×, 0.2271 µm/px = 44.03×)."""
        return MAG_TIMES_MPP / self.need_mpp()[0]

    @property
    def target_magnification(self) -> float:
        """Grid magnification ``10 / target_mpp`` (0.5 µm/px = 20×)."""
        return MAG_TIMES_MPP / self.target_mpp

    def need_coords(self) -> np.ndarray:
        """Level-0 coords, or raise SlideError when this slide has none (foreign grid-px-only features)."""
        if self.coords is None:
            raise SlideError(self.slide_path or self.slide_id, "no level-0 coordinates in the run (features were "
                             "given in grid px only); this format needs level-0 px")
        return self.coords

    def need_mpp(self) -> tuple[float, float]:
        """Level-0 mpp, or raise SlideError naming the missing attribute."""
        if self.level0_mpp is None:
            raise SlideError(self.slide_path or self.slide_id, "level-0 mpp unknown (no tiles.h5 source_mpp_x and no "
                             "level0_mpp attribute); this format needs it")
        return self.level0_mpp


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, Any]]]:
    import h5py

    with h5py.File(path, "r") as f:
        data = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        root = {k: _plain(v) for k, v in f.attrs.items()}
        per = {k: {a: _plain(v) for a, v in f[k].attrs.items()} for k in data}
    return data, root, per


def _read_or_fail(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, dict[str, Any]]]:
    try:
        return _read(path)
    except OSError as err:  # truncated or not HDF5: this slide fails, the export goes on
        raise SlideError(path, f"cannot read: {err}") from None


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _json_list(v: Any) -> list:
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            return []
    return [list(map(int, d)) for d in v] if v is not None else []


def read_slide(slide_dir: str | Path) -> SlideFeatures:
    """Read ``slide_dir`` (``OUT/<slide_id>/``) of a finished run, format_version 1 or 2.

    Raises:
        SlideError: ``tile_embeddings.h5`` missing or unreadable, or its coordinates inconsistent.
    """
    slide_dir = Path(slide_dir)
    emb_path = slide_dir / EMBEDDINGS_FILE
    if not emb_path.is_file():
        status = read_status(slide_dir) or {}
        if str(status.get("reader", "")).startswith("features:") and status.get("slide_path"):
            return _read_foreign(slide_dir, Path(status["slide_path"]))
        raise SlideError(emb_path, "missing: the run has no tile embeddings for this slide (no tile_encoder stage?)")
    data, root, per = _read_or_fail(emb_path)
    tattrs = _read_or_fail(slide_dir / TILES_FILE)[1] if (slide_dir / TILES_FILE).is_file() else {}
    if "features" not in data or "coords" not in data:
        raise SlideError(emb_path, f"not a tile-embeddings file: datasets {sorted(data)}, need features and coords")
    version = int(root.get("format_version", 1))
    if version >= 2:
        coords, grid = data["coords"], data.get("grid_coords")
        if grid is None:
            raise SlideError(emb_path, "format_version 2 file without grid_coords")
    else:  # v1: coords were grid px, coords_level0 level-0 px
        grid, coords = data["coords"], data.get("coords_level0")
    cattrs = per.get("coords", {})
    mpp = _level0_mpp(tattrs, cattrs, root)
    features = np.asarray(data["features"], dtype=np.float32)
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 2)
    if coords is not None:
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(features) != len(grid) or (coords is not None and len(coords) != len(grid)):
        raise SlideError(emb_path, f"row counts differ: features {len(features)}, grid_coords {len(grid)}, "
                         f"coords {None if coords is None else len(coords)}")
    slide_emb, sroot = None, {}
    if (slide_dir / SLIDE_FILE).is_file():
        sdata, sroot, _ = _read_or_fail(slide_dir / SLIDE_FILE)
        slide_emb = sdata.get("embedding")
    gattrs = per.get("grid_coords", {})
    read_size = tattrs.get("read_size")  # no tiles.h5 (foreign features): exporters fall back to level 0
    return SlideFeatures(
        slide_id=slide_dir.name,
        features=features, coords=coords, grid_coords=grid, level0_mpp=mpp,
        tile_size=int(tattrs.get("tile_size", gattrs.get("tile_size", root.get("tile_size", 256)))),
        target_mpp=float(tattrs.get("target_mpp", gattrs.get("target_mpp", root.get("target_mpp", 0.5)))),
        tile_encoder=str(root.get("tile_encoder", "")), weights_source=str(root.get("weights_source", "")),
        level=int(tattrs.get("level", 0)),
        read_size=None if read_size is None else int(read_size),
        level_dimensions=_json_list(tattrs.get("level_dimensions")),
        slide_path=str(tattrs.get("slide_path", root.get("slide_path", ""))),
        slide_embedding=None if slide_emb is None else np.asarray(slide_emb, dtype=np.float32),
        slide_encoder=str(sroot.get("slide_encoder", "")), slide_encoder_weights=str(sroot.get("weights_source", "")),
        attrs=root,
    )


def _read_foreign(slide_dir: Path, path: Path) -> SlideFeatures:
    """Tiles of a slide embedded from an existing feature file (TRIDENT, CLAM, STAMP, prov-gigapath, ours)."""
    try:
        from ..interop import read_tile_features
    except ImportError:
        raise SlideError(path, "the run read this slide's tiles from this feature file, and this version of "
                               "gigapath-core has no reader for it (gigapath_core.interop)") from None
    try:
        tf = read_tile_features(path)
    except (GigapathError, OSError) as err:
        raise SlideError(path, f"cannot read the tile features the run used: {err}") from None
    a = tf.attrs
    sdata, sroot = {}, {}
    if (slide_dir / SLIDE_FILE).is_file():
        sdata, sroot, _ = _read_or_fail(slide_dir / SLIDE_FILE)
    emb = sdata.get("embedding")
    mpp = None if tf.level0_mpp is None else (float(tf.level0_mpp), float(tf.level0_mpp))
    return SlideFeatures(
        slide_id=slide_dir.name, features=np.asarray(tf.features, dtype=np.float32),
        coords=None if tf.coords is None else np.asarray(tf.coords, dtype=np.int64).reshape(-1, 2),
        grid_coords=np.asarray(tf.grid_coords, dtype=np.int64).reshape(-1, 2), level0_mpp=mpp,
        tile_size=int(tf.tile_size), target_mpp=float(tf.target_mpp),
        tile_encoder=str(a.get("tile_encoder") or a.get("extractor") or a.get("encoder") or ""),
        weights_source=str(a.get("weights_source", "")), level=0, read_size=None, level_dimensions=[],
        slide_path=str(path), slide_embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
        slide_encoder=str(sroot.get("slide_encoder", "")), slide_encoder_weights=str(sroot.get("weights_source", "")),
        attrs=dict(a))


def _level0_mpp(tattrs: dict, cattrs: dict, root: dict) -> tuple[float, float] | None:
    if "source_mpp_x" in tattrs:
        return float(tattrs["source_mpp_x"]), float(tattrs.get("source_mpp_y", tattrs["source_mpp_x"]))
    for attrs in (cattrs, root):
        v = attrs.get("level0_mpp")
        if v is not None and not isinstance(v, str):
            v = np.atleast_1d(np.asarray(v, dtype=float))
            return float(v[0]), float(v[-1])
    return None


def list_slides(out: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Slides of run folder ``out``: (ids with status ok, rows of the others with ``slide_id``/``status``/``reason``).

    Uses ``OUT/manifest.csv`` for the order when present, and each slide's ``status.json`` marker as the truth.
    """
    import csv

    out = Path(out)
    ids: list[str] = []
    if (out / "manifest.csv").is_file():
        with open(out / "manifest.csv", newline="") as f:
            ids = [r["slide_id"] for r in csv.DictReader(f) if r.get("slide_id")]
    for p in sorted(out.glob("*/status.json")):
        if p.parent.name not in ids:
            ids.append(p.parent.name)
    ok, others = [], []
    for sid in ids:
        s = read_status(out / sid) or {}
        if s.get("status") == "ok":
            ok.append(sid)
        else:
            others.append({"slide_id": sid, "status": str(s.get("status", "pending")),
                           "reason": str(s.get("reason") or "no status marker: not processed")})
    return ok, others
