"""Physical units in one place: microns per pixel (mpp), level-0 pixels and grid pixels.

- *level-0 px*: pixels of the slide's full-resolution level, as stored in the file.
- *grid px*: pixels at the target resolution (default 0.5 µm/px, "20×"). Tile (col, row) of the grid has
  its top-left corner at grid px (col * tile_size, row * tile_size). The Prov-GigaPath slide encoder maps a
  coordinate to position cell (floor(x / 256), floor(y / 256)) (SPEC §1, §3), so it must receive grid px.
"""

from __future__ import annotations

import numpy as np

TARGET_MPP = 0.5
TILE_SIZE = 256
#: plausible level-0 mpp range for tiling at 0.5 µm/px (coarser scans would need upsampling)
MPP_RANGE = (0.1, 2.0)


def tile_size_level0(tile_size: int, target_mpp: float, source_mpp: float) -> float:
    """Side of one tile in level-0 px: ``tile_size * target_mpp / source_mpp``.

    Example: 256 px at 0.5 µm/px on a 0.2271 µm/px scan -> 563.6 level-0 px.
    """
    return tile_size * target_mpp / source_mpp


def grid_index_to_level0(index: np.ndarray, tile_size: int, target_mpp: float, source_mpp: tuple[float, float]) -> np.ndarray:
    """(N, 2) int grid (col, row) -> (N, 2) int64 level-0 px top-left (x, y), rounded to the nearest px."""
    index = np.asarray(index, dtype=np.float64).reshape(-1, 2)
    scale = np.array([tile_size * target_mpp / source_mpp[0], tile_size * target_mpp / source_mpp[1]])
    return np.rint(index * scale).astype(np.int64)


def grid_index_to_grid_px(index: np.ndarray, tile_size: int) -> np.ndarray:
    """(N, 2) int grid (col, row) -> (N, 2) int64 grid px (x, y) = index * tile_size."""
    return np.asarray(index, dtype=np.int64).reshape(-1, 2) * int(tile_size)


def level0_to_grid_px(coords: np.ndarray, source_mpp: tuple[float, float], target_mpp: float = TARGET_MPP) -> np.ndarray:
    """(N, 2) level-0 px -> (N, 2) float64 px at ``target_mpp`` (not snapped to the grid)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return coords * np.array([source_mpp[0] / target_mpp, source_mpp[1] / target_mpp])


def best_level_for_mpp(level_downsamples: list[float], source_mpp: float, target_mpp: float) -> int:
    """Coarsest pyramid level whose resolution is at or finer than ``target_mpp`` (never upsample from a
    coarser level when a finer one exists). Tolerates 1% rounding in stored downsamples."""
    best = 0
    for level, ds in enumerate(level_downsamples):
        if source_mpp * ds <= target_mpp * 1.01:
            best = level if level_downsamples[level] >= level_downsamples[best] else best
    return best
