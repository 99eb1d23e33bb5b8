"""One slide of an ``embed`` run, as the heatmap code needs it: tile embeddings, both coordinate systems, mpp.

Reads ``OUT/<slide_id>/tile_embeddings.h5`` with :func:`gigapath_core.interop.read_tile_features` (both layouts:
format_version 2 and the older version 1) and ``OUT/<slide_id>/tiles.h5``, whose ``coords`` (level-0 px in both
versions) and geometry (mpp, level-0 size, slide path, reader) the pictures need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import units
from ..errors import GigapathError

EMBEDDINGS_FILE = "tile_embeddings.h5"
TILES_FILE = "tiles.h5"


class HeatmapInputError(GigapathError):
    """A slide folder lacks what the heatmap needs (fails that slide only)."""


@dataclass
class SlideTiles:
    """Tiles of one slide.

    Attributes:
        slide_id: folder name.
        features: (N, D) float32 tile embeddings.
        coords: (N, 2) int64 level-0 px of each tile's top-left corner, (x, y).
        grid_coords: (N, 2) int64 px at ``target_mpp`` (what the slide encoder takes).
        mpp: (mpp_x, mpp_y) level-0 µm/px.
        target_mpp: µm/px of the tile grid (0.5 by default).
        tile_size: tile side in px at ``target_mpp``.
        level0_size: (width, height) of level 0 in px.
        slide_path, reader: where and how to read pixels again (montages, thumbnails).
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    grid_coords: np.ndarray
    mpp: tuple[float, float]
    target_mpp: float
    tile_size: int
    level0_size: tuple[int, int]
    slide_path: str
    reader: str

    @property
    def tile_side_level0(self) -> tuple[float, float]:
        """(w, h) of one tile in level-0 px: ``tile_size * target_mpp / mpp``."""
        return tuple(units.tile_size_level0(self.tile_size, self.target_mpp, m) for m in self.mpp)


def _attr_list(v) -> list:
    return json.loads(v) if isinstance(v, str) else [list(map(int, d)) for d in v]


def read_slide_tiles(slide_dir: str | Path) -> SlideTiles:
    """Read one slide folder of an embed run.

    Raises:
        HeatmapInputError: tile_embeddings.h5 or tiles.h5 missing, or their tile counts disagree.
    """
    from ..interop import read_tile_features
    from ..store import read_h5

    slide_dir = Path(slide_dir)
    emb_path, tiles_path = slide_dir / EMBEDDINGS_FILE, slide_dir / TILES_FILE
    for p in (emb_path, tiles_path):
        if not p.is_file():
            raise HeatmapInputError(f"{slide_dir.name}: no {p.name} (run the embed job with a tile encoder first)")
    tiles, tattrs = read_h5(tiles_path)
    try:  # both layouts of tile_embeddings.h5, checked (docs/formats.md); version 1 records no tile size
        tf = read_tile_features(emb_path, tile_size=int(tattrs["tile_size"]), target_mpp=float(tattrs["target_mpp"]))
    except GigapathError as err:
        raise HeatmapInputError(f"{slide_dir.name}: {err}") from None
    features, grid, coords = tf.features, tf.grid_coords, tiles["coords"]
    if len(coords) != len(features) or len(grid) != len(coords):
        raise HeatmapInputError(f"{slide_dir.name}: {EMBEDDINGS_FILE} has {len(features)} tiles but "
                                f"{TILES_FILE} has {len(coords)} (outputs of different runs?)")
    dims = _attr_list(tattrs["level_dimensions"])
    return SlideTiles(
        slide_id=slide_dir.name,
        features=np.asarray(features, dtype=np.float32),
        coords=np.asarray(coords, dtype=np.int64).reshape(-1, 2),
        grid_coords=np.asarray(grid, dtype=np.int64).reshape(-1, 2),
        mpp=(float(tattrs["source_mpp_x"]), float(tattrs["source_mpp_y"])),
        target_mpp=float(tattrs["target_mpp"]),
        tile_size=int(tattrs["tile_size"]),
        level0_size=(int(dims[0][0]), int(dims[0][1])),
        slide_path=str(tattrs.get("slide_path", "")),
        reader=str(tattrs.get("reader", "")),
    )
