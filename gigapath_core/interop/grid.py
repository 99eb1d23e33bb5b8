"""Snap tile positions to the slide encoder's grid and check that a grid is one.

The LongNet slide encoder places tile ``i`` at cell ``grid_coords[i] // tile_size`` (Xu et al. 2024, Methods:
Preprocessing WSIs; slide encoder (LongNet);
prov-gigapath ``gigapath/slide_encoder.py`` ``coords_to_pos``), so neighbouring tiles must be neighbouring cells.
Level-0 px of a 0.25 µm/px (40x) slide passed as grid px put them two cells apart (cells 0, 2, 4...), the bug
class of prov-gigapath #116/#67, STAMP #159, CLAM #289; :func:`check_grid` refuses such input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import reduce
from math import gcd

import numpy as np

from ..errors import ConfigError

log = logging.getLogger("gigapath")
#: largest distance (in cells) of a tile position from its grid cell before a warning (CLAM grids start at
#: each tissue contour's bounding box, so their offsets are arbitrary)
MAX_RESIDUAL = 0.25


def snap_to_cells(positions: np.ndarray, step: float, path: str = "") -> np.ndarray:
    """(N, 2) positions (any unit) / ``step`` (the tile pitch in that unit) -> (N, 2) int64 cell indices.

    Tolerates the rounding of a fractional pitch (a 563.6-px level-0 tile stored as 564 or rounded corners).
    Logs a warning when a position lies more than :data:`MAX_RESIDUAL` of a cell from its cell.
    """
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2) / float(step)
    cells = np.rint(pos).astype(np.int64)
    if len(pos):
        residual = float(np.abs(pos - cells).max())
        if residual > MAX_RESIDUAL:
            log.warning("%s: tile positions sit up to %.2f cells off the %.4g-unit grid (grids that start at each "
                        "tissue region, e.g. CLAM's); snapped to the nearest cell", path, residual, step)
    return cells


def cell_stride(cells: np.ndarray) -> int:
    """Greatest common divisor of every cell offset from the smallest cell (1 for a grid with neighbours)."""
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells) < 2:
        return 1
    off = np.abs(cells - cells.min(axis=0)).ravel()
    off = off[off > 0]
    return int(reduce(gcd, off.tolist(), 0)) or 1


def check_grid(grid_coords: np.ndarray, tile_size: int, path: str, key_prefix: str | Callable[[str], str] = "",
               target_mpp: float = 0.5, level0: tuple[np.ndarray, float] | None = None) -> np.ndarray:
    """Check ``grid_coords`` ((N, 2) grid px) before it reaches the slide encoder; return it as int64.

    Args:
        level0: ``(coords, level0_mpp)`` when the file stores both units (ours, format version 2): then the
            grid must agree with the level-0 px (within a quarter cell) instead of passing the stride test
            (a few scattered tissue specks may legitimately sit two cells apart).

    Raises:
        ConfigError (key ``<prefix>coords_unit`` / ``<prefix>level0_mpp``; ``key_prefix`` may also be a callable
            option name -> config key): values not finite, not whole multiples of ``tile_size``, or
            cells that all step by k >= 2, which is what level-0 px of a ``target_mpp / k`` µm/px slide
            look like (k = 2: a 0.25 µm/px, 40x slide); the message names the file and the keys that fix it.
    """
    key = key_prefix if callable(key_prefix) else (lambda name: f"{key_prefix}{name}")
    g = np.asarray(grid_coords)
    if g.ndim != 2 or g.shape[1] != 2:
        raise ConfigError(key("coords_unit"), f"{path}: coordinates have shape {g.shape}, expected (N, 2)")
    if not np.isfinite(g.astype(np.float64)).all():
        raise ConfigError(key("coords_unit"), f"{path}: non-finite tile coordinates")
    gi = np.rint(g.astype(np.float64)).astype(np.int64)
    bad = np.flatnonzero(((gi % int(tile_size)) != 0).any(axis=1) | (np.abs(g.astype(np.float64) - gi) > 1e-6).any(axis=1))
    if len(bad):
        i = int(bad[0])
        raise ConfigError(key("coords_unit"),
                          f"{path}: grid coordinate {tuple(int(v) for v in gi[i])} of tile {i} is not a multiple of "
                          f"tile_size {tile_size} ({len(bad)} of {len(gi)} tiles); these are not grid px at the "
                          f"target mpp: give {key('coords_unit')} (level0_px, grid_px or um), "
                          f"{key('level0_mpp')} or {key('tile_size')}")
    cells = gi // int(tile_size)
    k = cell_stride(cells)
    distinct = max(len(np.unique(cells[:, 0])), len(np.unique(cells[:, 1])))
    if level0 is not None:
        expected = np.asarray(level0[0], dtype=np.float64) * float(level0[1]) / target_mpp / int(tile_size)
        off = np.abs(expected - cells).max(axis=1) if len(cells) else np.zeros(0)
        if len(off) and off.max() > 0.25:
            i = int(np.argmax(off))
            raise ConfigError(key("level0_mpp"),
                              f"{path}: grid_coords {tuple(int(v) for v in gi[i])} of tile {i} does not match its "
                              f"level-0 coords {tuple(int(v) for v in np.asarray(level0[0])[i])} at level0_mpp "
                              f"{level0[1]:g} (expected grid px ~{tuple(round(float(v) * tile_size) for v in expected[i])})")
    elif k >= 2 and distinct >= 3:
        raise ConfigError(
            key("level0_mpp"),
            f"{path}: every tile is {k} grid cells from its neighbours (coordinates are multiples of "
            f"{k * int(tile_size)} on a {int(tile_size)}-px grid): these look like level-0 px of a "
            f"{target_mpp / k:g} µm/px slide passed as grid px; give {key('level0_mpp')} (e.g. {target_mpp / k:g}) or "
            f"{key('coords_unit')}: level0_px")
    dup = len(cells) - len(np.unique(cells, axis=0)) if len(cells) else 0
    if dup:
        log.warning("%s: %d tiles share a grid cell with another tile", path, dup)
    return gi
