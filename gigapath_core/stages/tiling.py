"""Tiling stage: open the slide with the first reader that can, lay the tile grid, write QC outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import SlideError, SlideOpenError
from ..kinds import WSI, Tiler, TileGrid
from ..store import write_bytes, write_h5, write_png

TILES_FILE = "tiles.h5"


def open_slide(path: str, readers: list[str]) -> WSI:
    """Open ``path`` with the first reader (in the given order) that can.

    Raises:
        SlideOpenError: no reader could open it; the message gives each reader's reason.
    """
    from ..api import build

    if not Path(path).is_file():
        raise SlideOpenError(path, "file not found")
    reasons = []
    for name in readers:
        reader = build("slide_reader", name)
        try:
            return reader.open(path)
        except SlideError as err:
            reasons.append(f"{name}: {str(err).replace(str(path) + ': ', '')}")
        except ImportError as err:
            reasons.append(f"{name}: not installed ({err})")
    raise SlideOpenError(path, "no reader could open it — " + "; ".join(reasons))


def tissue_geojson(grid: TileGrid) -> dict:
    """Tissue contours of the mask as a GeoJSON FeatureCollection in level-0 px (QuPath-compatible)."""
    from skimage import measure

    mask = np.pad(grid.tissue_mask.astype(np.uint8), 1)
    features = []
    for contour in measure.find_contours(mask, 0.5):
        if len(contour) < 4:
            continue
        xy = (contour[:, ::-1] - 1 + 0.5) * grid.mask_downsample  # (row, col) -> (x, y), undo pad
        ring = [[round(float(x), 1), round(float(y), 1)] for x, y in xy]
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def qc_thumbnail(grid: TileGrid) -> np.ndarray:
    """Thumbnail with the tissue-mask outline (green) and kept tiles (blue boxes), (h, w, 3) uint8."""
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    img = grid.thumbnail.copy()
    img[find_boundaries(grid.tissue_mask, mode="inner")] = (0, 200, 0)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    side = grid.tile_size * grid.target_mpp / grid.source_mpp[0] / grid.mask_downsample
    for x, y in grid.coords:
        x0, y0 = x / grid.mask_downsample, y / grid.mask_downsample
        draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(30, 60, 255))
    return np.asarray(pil)


def run_tiling(tiler: Tiler, wsi: WSI, slide_dir: Path, mpp: tuple[float, float] | None, attrs: dict) -> TileGrid:
    """Tile ``wsi`` and write ``tiles.h5``, ``thumbnail.png`` and ``tissue.geojson`` into ``slide_dir``."""
    grid = tiler.tile(wsi, mpp)
    write_png(slide_dir / "thumbnail.png", qc_thumbnail(grid))
    write_bytes(slide_dir / "tissue.geojson", json.dumps(tissue_geojson(grid)).encode())
    write_h5(
        slide_dir / TILES_FILE,
        {
            "coords": grid.coords.astype(np.int64).reshape(-1, 2),
            "grid_coords": grid.grid_coords.astype(np.int64).reshape(-1, 2),
            "occupancy": grid.occupancy.astype(np.float32),
        },
        {
            **attrs,
            "reader": wsi.reader,
            "tiler": tiler.name,
            "source_mpp_x": float(grid.source_mpp[0]),
            "source_mpp_y": float(grid.source_mpp[1]),
            "target_mpp": float(grid.target_mpp),
            "tile_size": int(grid.tile_size),
            "level": int(grid.level),
            "read_size": int(grid.read_size),
            "level_dimensions": [list(d) for d in wsi.level_dimensions],
            "tiler_info": grid.info,
            "gigapath_version": __version__,
        },
    )
    return grid
