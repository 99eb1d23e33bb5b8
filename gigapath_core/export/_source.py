"""Read one finished slide folder of a run (``OUT/<slide_id>/``) into one in-memory record for the exporters.

The tiles come from :func:`gigapath_core.interop.read_tile_features` (the project's one reader of tile-feature
files: both layouts of our ``tile_embeddings.h5``, docs/formats.md, and, for a slide of an embed run on existing
features — ``status.json`` ``reader`` = ``features:<fmt>`` — the feature file named in its ``slide_path``). The
level-0 mpp and the read geometry (``level``, ``read_size``, ``level_dimensions``) come from ``tiles.h5``'s root
attributes (``source_mpp_x``/``source_mpp_y``), else from the feature file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import units
from ..errors import GigapathError, SlideError
from ..store import read_status

EMBEDDINGS_FILE = "tile_embeddings.h5"
TILES_FILE = "tiles.h5"
SLIDE_FILE = "slide_embedding.h5"


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
        return units.tile_size_level0(self.tile_size, self.target_mpp, self.need_mpp()[0])

    @property
    def level0_magnification(self) -> float:
        """Level-0 magnification ``10 / mpp`` (0.25 µm/px = 40×, 0.2271 µm/px = 44.03×)."""
        return units.mpp_to_magnification(self.need_mpp()[0])

    @property
    def target_magnification(self) -> float:
        """Grid magnification ``10 / target_mpp`` (0.5 µm/px = 20×)."""
        return units.mpp_to_magnification(self.target_mpp)

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
    """Read ``slide_dir`` (``OUT/<slide_id>/``) of a finished run, format_version 1 or 2, or embedded from an
    existing feature file.

    Raises:
        SlideError: ``tile_embeddings.h5`` (or the feature file the run used) missing, unreadable or inconsistent,
            or ``tiles.h5`` / ``slide_embedding.h5`` unreadable.
    """
    from ..interop import read_tile_features

    slide_dir = Path(slide_dir)
    path, foreign = slide_dir / EMBEDDINGS_FILE, False
    if not path.is_file():
        status = read_status(slide_dir) or {}
        if not (str(status.get("reader", "")).startswith("features:") and status.get("slide_path")):
            raise SlideError(path, "missing: the run has no tile embeddings for this slide (no tile_encoder stage?)")
        path, foreign = Path(status["slide_path"]), True
    tattrs = {} if foreign or not (slide_dir / TILES_FILE).is_file() else _read_or_fail(slide_dir / TILES_FILE)[1]
    grid = {k: tattrs[k] for k in ("tile_size", "target_mpp") if k in tattrs}  # version 1 records neither
    try:
        tf = read_tile_features(path, **grid)
    except (GigapathError, OSError) as err:
        what = "the tile features the run used" if foreign else "its tile embeddings"
        raise SlideError(path, f"cannot read {what}: {err}") from None
    sdata, sroot = {}, {}
    if (slide_dir / SLIDE_FILE).is_file():
        sdata, sroot, _ = _read_or_fail(slide_dir / SLIDE_FILE)
    emb, a = sdata.get("embedding"), tf.attrs
    read_size = tattrs.get("read_size")  # no tiles.h5 (foreign features): exporters fall back to level 0
    return SlideFeatures(
        slide_id=slide_dir.name, features=np.asarray(tf.features, dtype=np.float32),
        coords=None if tf.coords is None else np.asarray(tf.coords, dtype=np.int64).reshape(-1, 2),
        grid_coords=np.asarray(tf.grid_coords, dtype=np.int64).reshape(-1, 2), level0_mpp=_level0_mpp(tattrs, tf),
        tile_size=int(tf.tile_size), target_mpp=float(tf.target_mpp),
        tile_encoder=str(a.get("tile_encoder") or a.get("extractor") or a.get("encoder") or ""),
        weights_source=str(a.get("weights_source", "")), level=int(tattrs.get("level", 0)),
        read_size=None if read_size is None else int(read_size),
        level_dimensions=_json_list(tattrs.get("level_dimensions")),
        slide_path=str(path) if foreign else str(tattrs.get("slide_path", a.get("slide_path", ""))),
        slide_embedding=None if emb is None else np.asarray(emb, dtype=np.float32),
        slide_encoder=str(sroot.get("slide_encoder", "")), slide_encoder_weights=str(sroot.get("weights_source", "")),
        attrs=dict(a))


def _level0_mpp(tattrs: dict, tf) -> tuple[float, float] | None:
    """(x, y) level-0 µm/px: ``tiles.h5`` (both axes) if the run tiled the slide, else the feature file's."""
    if "source_mpp_x" in tattrs:
        return float(tattrs["source_mpp_x"]), float(tattrs.get("source_mpp_y", tattrs["source_mpp_x"]))
    return None if tf.level0_mpp is None else (float(tf.level0_mpp), float(tf.level0_mpp))


#: files another job writes at the top of its output folder -> that job (finetune/runner.py, ablation.py, heatmap)
OTHER_OUTPUTS = (("metrics.json", "finetune"), ("ablation.json", "ablation"), ("heatmaps.json", "heatmap"))


def other_job_output(out: str | Path) -> str | None:
    """The job whose output folder ``out`` looks like, when it is not an embed run folder, else None.

    An embed run folder has ``manifest.csv`` (or the ``manifest-shard-K-of-N.csv`` of a sharded run still under
    way); without one, ``config.yaml``'s ``job`` (finetune writes it) or one of :data:`OTHER_OUTPUTS` names the
    job, e.g. ``finetune`` for a folder of ``fold_<k>/status.json`` that must not be taken for slides.
    """
    out = Path(out)
    if (out / "manifest.csv").is_file() or any(out.glob("manifest-shard-*.csv")):
        return None
    cfg = out / "config.yaml"
    if cfg.is_file():
        import yaml

        try:
            job = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("job")
        except (yaml.YAMLError, OSError, UnicodeDecodeError, AttributeError):
            job = None
        if isinstance(job, str) and job and job != "embed":
            return job
    return next((job for name, job in OTHER_OUTPUTS if (out / name).is_file()), None)


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
