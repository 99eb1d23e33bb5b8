"""One reader for tile-feature files of any tool: ours (v2, v1), TRIDENT, CLAM (h5/pt), STAMP, prov-gigapath.

Every reader of tile embeddings in gigapath goes through :func:`read_tile_features`, which works the units out
from the file's own attributes (or the caller's ``level0_mpp`` / ``coords_unit`` / ``tile_size``), converts the
tile positions to grid px at ``target_mpp`` and checks them (:func:`gigapath_core.interop.grid.check_grid`).
The rule for a tiled format: tile ``i`` is one grid cell, ``round(position / pitch)``, where the pitch is the
tile step in the unit of the file's ``coords`` (TRIDENT ``patch_size_level0``; CLAM ``patch_size`` x
``downsample``; STAMP ``tile_size_um``; else ``tile_size * target_mpp / level0_mpp`` level-0 px). A TRIDENT file
of a 0.2271 µm/px slide (tiled at its rounded "40x", step 512) thus still gives neighbouring cells.

The cell side (``tile_size``, px at ``target_mpp``) is the one the file records, as each tool writes it
(:func:`file_grid`); ``grid_coords = cell * tile_size``. A file's record wins over the caller's ``tile_size``,
which only fills in for files that record none (CLAM feature files, official prov-gigapath files, our version 1),
so every ``gigapath export`` reads back with the grid the run wrote (128-px tiles stay 128 px apart).
"""

from __future__ import annotations

import logging

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import units
from ..errors import ConfigError, FeatureFileError
from .contract import COORDS_UNITS
from .formats import FORMATS, decode, detect_format
from .grid import check_grid, snap_to_cells

log = logging.getLogger("gigapath")


@dataclass
class TileFeatures:
    """Tile embeddings of one slide with positions in both units.

    Attributes:
        features: (N, D) float32 tile embeddings.
        grid_coords: (N, 2) int64 grid px at ``target_mpp``, multiples of ``tile_size`` (what LongNet takes).
        coords: (N, 2) int64 level-0 px top-left (x, y), or None when the file does not tell them (a STAMP or
            prov-gigapath file without ``level0_mpp``).
        level0_mpp: µm/px of level 0, or None when unknown.
        tile_size: grid cell side in px at ``target_mpp`` (256).
        target_mpp: µm/px of the grid (0.5).
        source_format: the layout read (``gigapath``, ``trident``, ``clam``, ``stamp``, ``prov-gigapath``).
        path: the file read (the ``.pt`` for CLAM ``pt_files``).
        attrs: the file's root attributes (decoded) plus ``format_version`` (1 for our old layout).
    """

    features: np.ndarray
    grid_coords: np.ndarray
    coords: np.ndarray | None
    level0_mpp: float | None
    tile_size: int
    target_mpp: float
    source_format: str
    path: Path
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1]) if self.features.ndim == 2 else 0


def _attrs(obj) -> dict[str, Any]:
    return {k: decode(v) for k, v in obj.attrs.items()}


def _need(path: Path, what: str, name: str, key) -> ConfigError:
    return ConfigError(key(name), f"{path}: {what}; give it with {key(name)}")


def _load_pt(path: Path) -> np.ndarray:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise FeatureFileError(path, f"cannot load as a tensor file ({type(err).__name__}: {err})") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("features", "feats") if k in obj), None)
    if not isinstance(obj, torch.Tensor):
        raise FeatureFileError(path, "expected a (N, D) tensor of tile features (CLAM pt_files layout)")
    return obj.float().numpy()


def read_tile_features(path: str | Path, *, level0_mpp: float | None = None, coords_unit: str | None = None,
                       tile_size: int | None = None, target_mpp: float = units.TARGET_MPP, fmt: str = "auto",
                       key_prefix: str = "", keys: dict[str, str] | None = None) -> TileFeatures:
    """Read one slide's tile features and their positions from a file of any supported tool.

    Args:
        path: an ``.h5`` (ours, TRIDENT, CLAM ``h5_files``, STAMP, prov-gigapath) or a CLAM ``pt_files/*.pt``
            (coordinates then come from the sibling ``h5_files/<slide>.h5``).
        level0_mpp: µm/px of the slide's level 0, for files that do not record it (CLAM, STAMP).
        coords_unit: what the file's ``coords`` are in, ``level0_px`` | ``grid_px`` | ``um`` (default: from
            the format: TRIDENT/CLAM level-0 px, STAMP µm, prov-gigapath grid px).
        tile_size: grid cell side in px at ``target_mpp`` for files that record none (default 256); a file's own
            record wins (:func:`file_grid`: ours, TRIDENT ``patch_size``, STAMP ``tile_size_um``).
        target_mpp: µm/px of the grid (0.5, the Prov-GigaPath slide encoder's), unless the file records the grid
            it was written on (ours: ``grid_coords``/``coords`` attribute ``target_mpp``).
        fmt: ``auto`` or one of :data:`gigapath_core.interop.formats.FORMATS`.
        key_prefix: prefix of the config keys named in errors (``data.`` -> ``data.level0_mpp``).
        keys: config key per option where it is not ``key_prefix + name`` (the embed job: ``{"level0_mpp":
            "inputs.mpp"}``).
    Returns:
        :class:`TileFeatures` with checked ``grid_coords``.
    Raises:
        ConfigError: units cannot be worked out (names the file, the missing attribute and the key that
            supplies it) or the positions are not a grid (e.g. level-0 px passed as grid px).
        FeatureFileError: missing file or datasets, row counts that differ, non-finite coordinates.
        NonFiniteError: non-finite features (names the tile encoder that wrote them).
    """
    path = Path(path)
    key_names = dict(keys or {})

    def key(name: str) -> str:
        return key_names.get(name, f"{key_prefix}{name}")

    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(key("format"), f"unknown feature format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    if coords_unit is not None and coords_unit not in COORDS_UNITS:
        raise ConfigError(key("coords_unit"), f"unknown unit {coords_unit!r}; valid: {', '.join(COORDS_UNITS)}")
    if not path.is_file():
        raise FeatureFileError(path, "tile-feature file not found")
    if path.suffix == ".pt":
        return _read_pt(path, level0_mpp, coords_unit, tile_size, target_mpp, key_prefix, keys)
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise FeatureFileError(path, f"not a readable HDF5 file ({err})") from None
    with f:
        names = set(f.keys())
        root = _attrs(f)
        cattrs = _attrs(f["coords"]) if "coords" in names else {}
        fmt = detect_format(path, names, root, cattrs) if fmt == "auto" else fmt
        fkey = "feats" if fmt == "stamp" else "features"
        if fkey not in names or "coords" not in names:
            raise FeatureFileError(path, f"a {fmt} tile-feature file needs datasets '{fkey}' and 'coords' "
                                         f"(has {', '.join(sorted(names)) or 'none'})")
        data = {k: f[k][()] for k in (fkey, "coords", "grid_coords", "coords_level0") if k in names}
        gattrs = _attrs(f["grid_coords"]) if "grid_coords" in names else {}
    features = np.asarray(data[fkey], dtype=np.float32)
    if features.size == 0:
        features = features.reshape(0, features.shape[1] if features.ndim == 2 else 0)
    return _assemble(path, fmt, features, data, root, cattrs, gattrs, level0_mpp, coords_unit, tile_size,
                     target_mpp, key)


def _read_pt(path, level0_mpp, coords_unit, tile_size, target_mpp, prefix, keys) -> TileFeatures:
    h5 = path.parent.parent / "h5_files" / f"{path.stem}.h5"
    if not h5.is_file():
        raise FeatureFileError(path, f"a CLAM .pt file holds features only; its coordinates come from "
                                     f"{h5} (h5_files/ beside pt_files/), which does not exist")
    tf = read_tile_features(h5, level0_mpp=level0_mpp, coords_unit=coords_unit, tile_size=tile_size,
                            target_mpp=target_mpp, fmt="clam", key_prefix=prefix, keys=keys)
    feats = _load_pt(path)
    if feats.ndim != 2 or len(feats) != len(tf.grid_coords):
        raise FeatureFileError(path, f"{tuple(feats.shape)} features but {len(tf.grid_coords)} coordinates in {h5}")
    _check_finite(path, feats)
    tf.features, tf.path = feats, path
    return tf


def _check_finite(path: Path, features: np.ndarray, attrs: dict | None = None) -> None:
    """Raises NonFiniteError (a SlideError: that slide fails) naming the count, the first tile and the encoder
    that wrote the file. Our tile-embedding stage never writes such a file: an older gigapath or another tool did."""
    from ..errors import NonFiniteError

    finite = np.isfinite(features).all(axis=1) if features.ndim == 2 else np.isfinite(features)
    if not finite.all():
        i, attrs = int(np.argmin(finite)), attrs or {}
        encoder = attrs.get("tile_encoder", attrs.get("extractor", "?"))
        raise NonFiniteError(path, f"the tile embeddings are non-finite (NaN/Inf) for {int((~finite).sum())} of "
                                   f"{len(features)} tiles, first tile {i}, written by tile encoder {encoder!r} "
                                   f"(weights {attrs.get('weights_source', '?')}); delete {path.name} to recompute it")


def _num(v) -> float | None:
    """A positive finite attribute value as float, else None (TRIDENT stores missing values as 'None')."""
    try:
        x = float(np.ravel(v)[0]) if v is not None else None
    except (TypeError, ValueError):
        return None
    return x if x is not None and np.isfinite(x) and x > 0 else None


def _stamp_side_um(root: dict) -> float | None:
    """STAMP's tile side in µm: root ``tile_size_um`` (KatherLab/STAMP src/stamp/preprocessing/__init__.py
    ``extract_``), or ``tile_size`` in files whose ``unit`` is "um" (STAMP before v2.1.0)."""
    return _num(root.get("tile_size_um")) or (_num(root.get("tile_size")) if root.get("unit") == "um" else None)


def file_grid(fmt: str, root: dict, cattrs: dict, tile_size: int | None, target_mpp: float,
              path: str = "") -> tuple[int, float]:
    """(tile_size, target_mpp) of the grid a foreign-layout file was written on, from its own attributes.

    - ``target_mpp``: the ``target_mpp`` attribute on ``coords`` (ours: every ``gigapath export`` writes it),
      else the caller's.
    - ``tile_size``: ours, the ``tile_size`` attribute on ``coords`` (CLAM and prov-gigapath exports); else the
      tile side in µm over ``target_mpp``, the side taken from
      TRIDENT ``coords.attrs['patch_size']`` px at ``10 / target_magnification`` µm/px (mahmoodlab/TRIDENT
      ``trident/IO.py`` ``coords_to_h5``; at the ``target_mpp`` attribute when we wrote the file; only beside
      ``target_magnification``: our CLAM export, detected as TRIDENT by its ``patch_size_level0``, holds CLAM's
      ``patch_size``),
      STAMP root ``tile_size_um`` (KatherLab/STAMP ``src/stamp/preprocessing/__init__.py`` ``extract_``; its
      ``tile_size_px`` is the size the extractor was fed, not the grid),
      or, in files we wrote, ``tile_size_level0`` x ``level0_mpp`` (CLAM exports before ``tile_size``; CLAM's own ``patch_size`` is the side read
      at ``patch_level``, mahmoodlab/CLAM ``wsi_core/WholeSlideImage.py`` ``process_contour``, and carries no
      µm: a CLAM file records no grid); else the caller's ``tile_size``, else 256.

    A 20x, 256-px TRIDENT file and a 128-µm STAMP file thus give 256; a gigapath export of a run with 128-px
    tiles gives 128 in every format. A side that is not a whole number of px at ``target_mpp`` is rounded.
    """
    recorded_target = _num(cattrs.get("target_mpp"))
    target_mpp = recorded_target or float(target_mpp)
    ours = _num(cattrs.get("tile_size")) if recorded_target else None
    if ours:
        return int(round(ours)), target_mpp
    side_um, target_mag = None, _num(cattrs.get("target_magnification"))
    if fmt == "trident" and _num(cattrs.get("patch_size")) and target_mag:  # CLAM's patch_size comes without it
        side_um = _num(cattrs["patch_size"]) * (recorded_target or units.magnification_to_mpp(target_mag))
    elif fmt == "stamp":
        side_um = _stamp_side_um(root)
    elif recorded_target and _num(cattrs.get("tile_size_level0")) and _num(cattrs.get("level0_mpp")):
        side_um = _num(cattrs["tile_size_level0"]) * _num(cattrs["level0_mpp"])  # ours, e.g. an older CLAM export
    if side_um is None:
        return int(tile_size or units.TILE_SIZE), target_mpp
    side = side_um / target_mpp
    if abs(side - round(side)) > 0.01:
        log.warning("%s: tiles of %.4g µm are %.3f px at %g µm/px; the grid takes %d-px cells", path, side_um, side,
                    target_mpp, round(side))
    return max(1, int(round(side))), target_mpp


def _file_level0_mpp(fmt: str, root: dict, cattrs: dict) -> float | None:
    """Level-0 µm/px a foreign-layout file records: ours (``level0_mpp`` on ``coords``, or at the root of the
    STAMP and prov-gigapath exports), else TRIDENT's ``10 / level0_magnification``; None when it records none."""
    exact = _num(cattrs.get("level0_mpp")) or _num(root.get("level0_mpp"))
    if exact:
        return exact
    if fmt == "trident" and _num(cattrs.get("level0_magnification")):
        return units.magnification_to_mpp(_num(cattrs["level0_magnification"]))
    return None


def _pitch_level0(path: Path, fmt: str, cattrs: dict, level0_mpp: float | None, tile_size: int,
                  target_mpp: float, key) -> float:
    """Tile step in level-0 px: from the file's attributes, else from ``level0_mpp``."""
    if fmt == "trident":
        ps = cattrs.get("patch_size")
        if cattrs.get("tile_size_level0"):  # the exact side, when we wrote the file (patch_size_level0 is floored)
            side = float(cattrs["tile_size_level0"])
        elif cattrs.get("patch_size_level0"):
            side = float(cattrs["patch_size_level0"])
        elif ps and cattrs.get("level0_magnification") and cattrs.get("target_magnification"):
            side = float(ps) * float(cattrs["level0_magnification"]) / float(cattrs["target_magnification"])
        else:
            side = None
        if side is not None:
            overlap = float(cattrs.get("overlap") or 0)
            return side - (overlap * side / float(ps) if ps else 0.0)
    if fmt == "clam" and cattrs.get("patch_size"):
        ds = cattrs.get("downsample")
        if ds is not None:
            return float(cattrs["patch_size"]) * float(np.ravel(ds)[0])
        if int(cattrs.get("patch_level", -1)) == 0:
            return float(cattrs["patch_size"])
    if level0_mpp is None:
        missing = {"trident": "coords.attrs['patch_size_level0']",
                   "clam": "coords.attrs 'patch_size' and 'downsample' (CLAM feature files carry none)"}
        raise _need(path, f"coords are level-0 px but the tile size is unknown: no {missing.get(fmt, 'level0_mpp attribute')} "
                          f"and no level-0 µm/px", "level0_mpp", key)
    return units.tile_size_level0(tile_size, target_mpp, level0_mpp)


def _assemble(path: Path, fmt: str, features: np.ndarray, data: dict, root: dict, cattrs: dict, gattrs: dict,
              level0_mpp: float | None, coords_unit: str | None, tile_size: int | None, target_mpp: float,
              key) -> TileFeatures:
    raw = np.asarray(data["coords"])
    if raw.size == 0:
        raw = raw.reshape(0, 2)
    if features.ndim != 2 or raw.ndim != 2 or raw.shape != (len(features), 2):
        raise FeatureFileError(path, f"features {tuple(features.shape)} and coords {tuple(raw.shape)} do not "
                                     f"describe the same (N, D) / (N, 2) tiles")
    if not np.isfinite(raw.astype(np.float64)).all():
        raise FeatureFileError(path, "non-finite tile coordinates")
    _check_finite(path, features, root)
    attrs = dict(root)
    coords = None
    if fmt == "gigapath" and ("grid_coords" in data or int(root.get("format_version", 1)) >= 2):
        # ours, v2: both units stored
        if "grid_coords" not in data:
            raise FeatureFileError(path, "format_version 2 file without 'grid_coords'")
        tile_size = int(gattrs.get("tile_size", tile_size or units.TILE_SIZE))
        target_mpp = float(gattrs.get("target_mpp", target_mpp))
        stride = int(gattrs.get("stride", tile_size))
        if stride != tile_size:  # overlapping tiles (tiler.params.stride): no place on the slide encoders' grid
            raise FeatureFileError(path, f"its tiles overlap (tiler stride {stride} px, tile_size {tile_size}): "
                                         f"they have no cell of their own on the {tile_size}-px position grid a "
                                         f"slide encoder takes; embed the slides again with stride = tile_size "
                                         f"(docs/slides.md)")
        grid = data["grid_coords"]
        coords = np.asarray(raw, dtype=np.int64)
        level0_mpp = float(cattrs["level0_mpp"]) if "level0_mpp" in cattrs else level0_mpp
    elif fmt == "gigapath":
        # ours, v1: coords were grid px, coords_level0 level-0 px
        attrs.setdefault("format_version", 1)
        tile_size = int(tile_size or units.TILE_SIZE)
        grid = raw
        if "coords_level0" in data:
            coords = np.asarray(data["coords_level0"], dtype=np.int64).reshape(-1, 2)
    else:
        tile_size, target_mpp = file_grid(fmt, root, cattrs, tile_size, target_mpp, str(path))
        if level0_mpp is None:
            level0_mpp = _file_level0_mpp(fmt, root, cattrs)
        unit = coords_unit or {"stamp": "um", "prov-gigapath": "grid_px"}.get(fmt, "level0_px")
        if fmt == "prov-gigapath" and coords_unit is None and not cattrs:
            log.warning("%s: coords carry no unit; read as grid px at %g µm/px (the official prov-gigapath layout). "
                        "If they are level-0 px, set %s: level0_px and %s", path, target_mpp, key("coords_unit"),
                        key("level0_mpp"))
        pos = raw.astype(np.float64)
        if unit == "grid_px":
            grid = raw
            if level0_mpp is not None:
                coords = np.rint(pos * target_mpp / level0_mpp).astype(np.int64)
        elif unit == "um":
            if fmt == "stamp" and root.get("unit", "um") != "um":
                raise _need(path, f"coords unit is {root.get('unit')!r} (STAMP files record 'um')", "coords_unit", key)
            side_um = _stamp_side_um(root)
            if not side_um and fmt == "stamp" and coords_unit is None:
                raise _need(path, "no root attribute 'tile_size_um' (a historic STAMP file): the unit of its coords "
                                  "is unknown (coords_unit: um takes tiles of tile_size px at 0.5 µm/px)",
                            "coords_unit", key)
            side_um = float(side_um) if side_um else tile_size * target_mpp
            grid = snap_to_cells(pos, side_um, str(path)) * tile_size
            if level0_mpp is not None:
                coords = np.rint(pos / level0_mpp).astype(np.int64)
        else:
            pitch = _pitch_level0(path, fmt, cattrs, level0_mpp, tile_size, target_mpp, key)
            grid = snap_to_cells(pos, pitch, str(path)) * tile_size
            coords = np.rint(pos).astype(np.int64)
    both = (coords, level0_mpp) if fmt == "gigapath" and coords is not None and "level0_mpp" in cattrs else None
    grid = check_grid(np.asarray(grid).reshape(-1, 2), tile_size, str(path), key, target_mpp, level0=both)
    if coords is not None and coords.shape != grid.shape:
        raise FeatureFileError(path, f"level-0 coords {coords.shape} and grid coords {grid.shape} differ in shape")
    return TileFeatures(features, grid, coords, None if level0_mpp is None else float(level0_mpp), int(tile_size),
                        float(target_mpp), fmt, path, attrs)
