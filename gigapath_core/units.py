"""Physical units in one place: microns per pixel (mpp), level-0 pixels and grid pixels.

- *level-0 px*: pixels of the slide's full-resolution level, as stored in the file.
- *grid px*: pixels at the target resolution (default 0.5 µm/px, "20×"). Tile (col, row) of the grid has
  its top-left corner at grid px (col * tile_size, row * tile_size). The Prov-GigaPath slide encoder maps a
  coordinate to position cell (floor(x / 256), floor(y / 256)) (Xu et al. 2024, Methods: Preprocessing WSIs; slide
  encoder (LongNet)), so it must receive grid px.
"""

from __future__ import annotations

import math

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


def patch_size_level0(side: float) -> int:
    """A tile side in level-0 px as the one integer TRIDENT's ``patch_size_level0`` holds, chosen so that
    ``floor(coords / size)`` gives each tile's grid cell for our coords ``round(cell * side)``.

    TRIDENT's slide encoders place tiles at ``floor(coords / patch_size_level0)``
    (mahmoodlab/TRIDENT trident/slide_encoder_models/load.py, GigaPathSlideEncoder). ``round(side)`` would put
    cell 3 of a 0.499 µm/px slide (x = 770, side 256.5 -> 257) in cell 2; ``floor(side)`` maps cell i to i for
    every i < (floor(side) - 0.5) / frac(side) (> 500 tiles, 6 cm, at 0.499 µm/px; > 880 at 0.2271 µm/px). The
    exact side goes in the ``tile_size_level0`` attribute beside it.
    """
    return int(round(side)) if abs(side - round(side)) < 1e-6 else int(math.floor(side))


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


#: magnification convention shared by TRIDENT (trident/wsi_objects/WSIPatcher.py: ``10 / src_mag``) and the
#: field: 10x = 1 µm/px, so 0.5 µm/px = 20x and 0.25 µm/px = 40x.
MAGNIFICATION_TIMES_MPP = 10.0


def mpp_to_magnification(mpp: float) -> float:
    """µm/px -> nominal objective magnification ``10 / mpp`` (0.25 -> 40.0, 0.2271 -> 44.03; not rounded)."""
    return MAGNIFICATION_TIMES_MPP / float(mpp)


def magnification_to_mpp(magnification: float) -> float:
    """Nominal magnification -> µm/px ``10 / magnification`` (40 -> 0.25)."""
    return MAGNIFICATION_TIMES_MPP / float(magnification)


def best_level_for_mpp(level_downsamples: list[float], source_mpp: float, target_mpp: float) -> int:
    """Coarsest pyramid level whose resolution is at or finer than ``target_mpp`` (never upsample from a
    coarser level when a finer one exists). Tolerates 1% rounding in stored downsamples."""
    best = 0
    for level, ds in enumerate(level_downsamples):
        if source_mpp * ds <= target_mpp * 1.01:
            best = level if level_downsamples[level] >= level_downsamples[best] else best
    return best


# ------------------------------------------------------------------------------- mpp from metadata
#: micrometres per unit of the length units used by OME-XML (``PhysicalSizeXUnit``) and TIFF files
LENGTH_UNITS_UM: dict[str, float] = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
    "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6, "in": 25400.0, "inch": 25400.0,
}


def length_to_um(value: float, unit: str | None = "µm") -> float:
    """A physical length in ``unit`` -> micrometres. ``unit`` None or "" means µm (the OME-XML default).

    Raises:
        ValueError: unknown unit (e.g. "reference frame", OME's unit for unknown physical size).
    """
    unit = (unit or "µm").strip()
    if unit not in LENGTH_UNITS_UM:
        raise ValueError(f"unknown length unit {unit!r}")
    return float(value) * LENGTH_UNITS_UM[unit]


def tiff_resolution_to_mpp(resolution: float, unit: int | str | None) -> float | None:
    """TIFF ``XResolution``/``YResolution`` (pixels per ``ResolutionUnit``) -> µm/px, or None when unusable.

    ``unit`` is the TIFF ``ResolutionUnit`` code (2 = inch, 3 = centimetre; 1 = no absolute unit, the
    TIFF 6.0 default when the tag is absent is 2) or its name ("inch", "centimeter", "cm", "in"). A resolution
    of 0, 1 (the writer's "unknown" placeholder) or a missing/dimensionless unit gives None, never a guess.
    """
    names = {"2": 25400.0, "inch": 25400.0, "in": 25400.0, "3": 1e4, "centimeter": 1e4, "centimetre": 1e4, "cm": 1e4}
    if unit is None or resolution is None:
        return None
    key = str(int(unit)) if isinstance(unit, (int, float)) or str(unit).isdigit() else str(unit).strip().lower()
    key = key.rsplit(".", 1)[-1]  # RESUNIT.CENTIMETER -> centimeter
    um_per_unit = names.get(key)
    resolution = float(resolution)
    if um_per_unit is None or not np.isfinite(resolution) or resolution <= 1.0:
        return None
    return um_per_unit / resolution


def check_mpp(path: str, mpp: tuple[float, float] | None, *, mpp_range: tuple[float, float] = MPP_RANGE,
              target_mpp: float = TARGET_MPP, override: bool = False) -> tuple[float, float]:
    """Validate a slide's level-0 mpp before tiling (issue #3 item 2; Xu et al. 2024, Methods: Preprocessing WSIs).

    Args:
        path: the slide (named in the error).
        mpp: (mpp_x, mpp_y) µm/px from the metadata or the user's override; None if neither has one.
        override: ``mpp`` came from the user (config ``inputs.mpp`` / CSV ``slide_mpp``), for the message.
    Returns:
        (mpp_x, mpp_y) as floats.
    Raises:
        MissingMppError: ``mpp`` is None; the message says how to supply it.
        ImplausibleMppError: a value is outside ``mpp_range`` (a slide much coarser than the target would
            need upsampling: e.g. 16.78 µm/px needs 33x; a value below the range is a unit mix-up).
    """
    from .errors import ImplausibleMppError, MissingMppError

    if mpp is None:
        raise MissingMppError(
            path,
            "no microns-per-pixel (mpp) in the slide metadata and no override given; supply it with "
            "inputs.mpp in the config, a slide_mpp column in the manifest CSV, or --set inputs.mpp=0.25",
        )
    mx, my = float(mpp[0]), float(mpp[1])
    lo, hi = mpp_range
    if not (np.isfinite(mx) and np.isfinite(my) and lo <= mx <= hi and lo <= my <= hi):
        where = "the override (inputs.mpp / slide_mpp)" if override else "the slide metadata"
        coarse = max(mx, my) > hi
        why = (f"it would need {max(mx, my) / target_mpp:.1f}x upsampling to reach {target_mpp} µm/px"
               if coarse and np.isfinite(max(mx, my)) else "it is below any scanner's resolution (unit mix-up?)")
        raise ImplausibleMppError(
            path,
            f"mpp {mx:.4g} x {my:.4g} µm/px from {where} is outside the plausible range {lo}-{hi} µm/px: {why}; "
            f"if the metadata is wrong, give the right value with inputs.mpp or a slide_mpp column",
        )
    return mx, my
