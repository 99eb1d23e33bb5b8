"""Otsu tissue segmentation + 256-px tile grid at 0.5 µm/px (SPEC §1; CLAM/HIPT practice).

Tissue mask: Otsu threshold on the HSV saturation of a ~1,024-px thumbnail after a median blur (default),
or on mean-RGB luminance (``method: luminance``, as the Prov-GigaPath reference does). Tiles are laid on a
grid of ``tile_size`` px at ``target_mpp``; a tile is kept when the fraction of its area covered by the
mask (its *occupancy*) is >= ``min_occupancy``. Kept tiles are listed row-major.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.errors import ImplausibleMppError, MissingMppError
from gigapath_core.kinds import WSI, PluginParams, Tiler, TileGrid
from gigapath_core.units import MPP_RANGE, best_level_for_mpp, grid_index_to_grid_px, grid_index_to_level0


def tissue_mask(thumb: np.ndarray, method: str = "saturation", median_size: int = 7, fill_holes: bool = True,
                min_area_px: int = 0) -> tuple[np.ndarray, float]:
    """(h, w, 3) uint8 RGB -> ((h, w) bool tissue mask, Otsu threshold)."""
    from scipy import ndimage
    from skimage import color, filters, morphology

    if method == "saturation":
        channel = (color.rgb2hsv(thumb)[..., 1] * 255).astype(np.uint8)
    else:
        channel = (255 - thumb.astype(np.float32).mean(-1)).astype(np.uint8)  # dark tissue -> high
    if median_size > 1:
        channel = ndimage.median_filter(channel, size=median_size)
    if channel.min() == channel.max():
        return np.zeros(channel.shape, bool), float(channel.max())
    thr = float(filters.threshold_otsu(channel))
    mask = channel > thr
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if min_area_px > 0:
        mask = morphology.remove_small_objects(mask, max_size=min_area_px)
    return mask, thr


def occupancy_grid(mask: np.ndarray, n_cols: int, n_rows: int, tile_mask_px: tuple[float, float]) -> np.ndarray:
    """(n_rows, n_cols) fraction of each grid cell covered by ``mask`` (cell side in mask px, x then y)."""
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    xs = np.clip(np.rint(np.arange(n_cols + 1) * tile_mask_px[0]).astype(int), 0, w)
    ys = np.clip(np.rint(np.arange(n_rows + 1) * tile_mask_px[1]).astype(int), 0, h)
    x0, x1 = xs[:-1][None, :], xs[1:][None, :]
    y0, y1 = ys[:-1][:, None], ys[1:][:, None]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    s = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return (s / area).astype(np.float32)


class OtsuTiler(Tiler):
    """Otsu tissue mask on a thumbnail; 256-px tiles at 0.5 µm/px kept at occupancy >= 0.1, row-major."""

    name = "otsu"

    class Params(PluginParams):
        tile_size: int = Field(256, ge=16, description="tile side in px at target_mpp")
        target_mpp: float = Field(0.5, gt=0, description="µm/px of the tiles (0.5 = 20x)")
        min_occupancy: float = Field(0.1, ge=0, le=1, description="keep tiles with tissue fraction >= this")
        thumbnail_size: int = Field(1024, ge=64, description="long side of the mask thumbnail, px")
        method: Literal["saturation", "luminance"] = "saturation"
        median_size: int = Field(7, ge=1, description="median blur kernel on the thumbnail, px")
        fill_holes: bool = True
        min_area_px: int = Field(0, ge=0, description="drop mask components smaller than this (thumbnail px)")
        mpp_range: tuple[float, float] = Field(MPP_RANGE, description="plausible level-0 mpp, µm/px")

    def __init__(self, **params):
        self.p = self.Params(**params)

    def _mpp(self, wsi: WSI, mpp):
        mpp = mpp or wsi.mpp
        if mpp is None:
            raise MissingMppError(
                wsi.path,
                "no microns-per-pixel in the slide metadata; give it with inputs.mpp in the config, "
                "a slide_mpp column in the manifest CSV, or --set inputs.mpp=0.25",
            )
        lo, hi = self.p.mpp_range
        if not all(lo <= m <= hi for m in mpp):
            raise ImplausibleMppError(
                wsi.path,
                f"mpp {mpp[0]:.4g} x {mpp[1]:.4g} µm/px is outside the plausible range {lo}-{hi} for tiling at "
                f"{self.p.target_mpp} µm/px; if the metadata is wrong, override it with inputs.mpp / slide_mpp",
            )
        return (float(mpp[0]), float(mpp[1]))

    def tile(self, wsi: WSI, mpp=None) -> TileGrid:
        p = self.p
        mpp = self._mpp(wsi, mpp)
        w0, h0 = wsi.level_dimensions[0]
        thumb = wsi.thumbnail(p.thumbnail_size)
        mask, thr = tissue_mask(thumb, p.method, p.median_size, p.fill_holes, p.min_area_px)
        ds = (w0 / mask.shape[1], h0 / mask.shape[0])  # level-0 px per mask px
        side0 = (p.tile_size * p.target_mpp / mpp[0], p.tile_size * p.target_mpp / mpp[1])
        n_cols, n_rows = int(w0 // side0[0]), int(h0 // side0[1])
        occ = occupancy_grid(mask, n_cols, n_rows, (side0[0] / ds[0], side0[1] / ds[1]))
        rows, cols = np.nonzero(occ >= p.min_occupancy)  # np.nonzero is row-major
        index = np.stack([cols, rows], 1)
        level = best_level_for_mpp(wsi.level_downsamples, mpp[0], p.target_mpp)
        read_size = int(round(side0[0] / wsi.level_downsamples[level]))
        return TileGrid(
            coords=grid_index_to_level0(index, p.tile_size, p.target_mpp, mpp),
            grid_coords=grid_index_to_grid_px(index, p.tile_size),
            occupancy=occ[rows, cols].astype(np.float32),
            tile_size=p.tile_size, target_mpp=p.target_mpp, source_mpp=mpp, level=level, read_size=read_size,
            tissue_mask=mask, mask_downsample=float(ds[0]), thumbnail=thumb,
            info={"method": p.method, "otsu_threshold": thr, "grid_cols": n_cols, "grid_rows": n_rows,
                  "tissue_fraction": float(mask.mean()), "min_occupancy": p.min_occupancy},
        )


@hookimpl
def gigapath_tilers():
    return [OtsuTiler]
