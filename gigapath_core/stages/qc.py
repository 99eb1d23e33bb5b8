"""The QC thumbnail (``thumbnail.png``): what the tiler saw and kept, readable at a glance (issue #13 item 2).

Drawn on the tissue-mask thumbnail: the tissue outline (green), the annotation mask's region (orange) and
excluded annotations (magenta) when one was used, kept tiles (blue boxes) and rejected tiles, i.e. grid cells
with some tissue that were not kept (occupancy below the threshold, or outside the annotations; thin red boxes).
Below the picture a legend band gives each colour with its count and a µm scale bar. Line widths scale with the
image (:func:`outline_width`), so the outline stays visible over dark tissue on any thumbnail size.
"""

from __future__ import annotations

import math

import numpy as np

from ..kinds import TileGrid

TISSUE_RGB, REGION_RGB, EXCLUDED_RGB, TILE_RGB = (0, 200, 0), (255, 140, 0), (220, 0, 200), (30, 60, 255)
REJECTED_RGB = (230, 40, 40)
LEGEND_BG, LEGEND_FG = (255, 255, 255), (20, 20, 20)


def outline_width(shape: tuple[int, ...]) -> int:
    """Outline width in px for a QC image of ``shape`` (h, w, ...): 2 px on a 1,024-px thumbnail, scaling with
    the long side (1 px below 768 px)."""
    return max(1, round(max(shape[:2]) / 512))


def cell_occupancy(mask: np.ndarray, side_px: tuple[float, float], n_cols: int, n_rows: int,
                   step_px: tuple[float, float] | None = None) -> np.ndarray:
    """(n_rows, n_cols) float tissue fraction of each grid cell measured on ``mask`` (h, w) bool, whose cells are
    ``side_px`` = (w, h) mask px, one every ``step_px`` (default ``side_px``: adjacent; a tiler ``stride``);
    a summed-area table makes it one pass over the mask."""
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
    step = step_px or side_px

    def edges(n: int, k: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        start = np.arange(n) * step[k]
        return (np.clip(np.rint(start).astype(int), 0, limit), np.clip(np.rint(start + side_px[k]).astype(int), 0, limit))

    x0, x1 = edges(n_cols, 0, mask.shape[1])
    y0, y1 = edges(n_rows, 1, mask.shape[0])
    area = np.maximum((y1 - y0)[:, None] * (x1 - x0)[None, :], 1)
    total = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    return total / area


def rejected_cells(grid: TileGrid, ds: tuple[float, float]) -> np.ndarray:
    """(M, 2) int grid (col, row) of cells with tissue on the mask that the tiler did not keep."""
    side0 = [grid.tile_size * grid.target_mpp / m for m in grid.source_mpp]
    side = (side0[0] / ds[0], side0[1] / ds[1])
    n_cols = int(grid.info.get("grid_cols", grid.tissue_mask.shape[1] // max(side[0], 1e-9)))
    n_rows = int(grid.info.get("grid_rows", grid.tissue_mask.shape[0] // max(side[1], 1e-9)))
    if n_cols <= 0 or n_rows <= 0:
        return np.zeros((0, 2), np.int64)
    stride = int(grid.info.get("stride", grid.tile_size))  # grid px between neighbouring tiles
    step = (side[0] * stride / grid.tile_size, side[1] * stride / grid.tile_size)
    some = cell_occupancy(grid.tissue_mask, side, n_cols, n_rows, step) > 0
    kept = (np.asarray(grid.grid_coords).reshape(-1, 2) // stride).astype(np.int64)
    inside = (kept[:, 0] < n_cols) & (kept[:, 1] < n_rows)
    some[kept[inside, 1], kept[inside, 0]] = False
    rows, cols = np.nonzero(some)
    return np.stack([cols, rows], 1).astype(np.int64)


def nice_scale_um(width_um: float) -> float:
    """A round scale-bar length (1, 2 or 5 × 10^k µm) of about a fifth of an image ``width_um`` wide."""
    target = max(width_um / 5, 1e-6)
    base = 10 ** math.floor(math.log10(target))
    return max(m * base for m in (1, 2, 5) if m * base <= target)


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib: has µ), else Pillow's default font."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
            return ImageFont.load_default()


def legend_band(width: int, entries: list[tuple[tuple[int, int, int], str]], um_per_px: float) -> np.ndarray:
    """(h, width, 3) uint8 band: a colour swatch and label per entry, then a µm scale bar of ``um_per_px``."""
    from PIL import Image, ImageDraw

    size = max(12, round(width / 60))
    font, pad, sw = _font(size), max(4, size // 2), size
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bar_um = nice_scale_um(width * um_per_px)
    bar_px = bar_um / um_per_px
    label = f"{bar_um:g} µm" if bar_um < 1000 else f"{bar_um / 1000:g} mm"
    items = [(sw + pad + draw.textlength(text, font=font), colour, text) for colour, text in entries]
    lines, line, used = [], [], 0.0
    avail = width - 2 * pad
    for it in items:
        if line and used + it[0] + 2 * pad > avail:
            lines.append(line)
            line, used = [], 0.0
        line.append(it)
        used += it[0] + 2 * pad
    lines.append(line)
    row_h = size + pad
    height = pad + row_h * (len(lines) + 1) + pad
    img = Image.new("RGB", (width, int(height)), LEGEND_BG)
    d = ImageDraw.Draw(img)
    y = pad
    for line in lines:
        x = pad
        for w, colour, text in line:
            d.rectangle([x, y + 1, x + sw, y + sw], outline=colour, width=max(2, sw // 5))
            d.text((x + sw + pad, y), text, fill=LEGEND_FG, font=font)
            x += w + 2 * pad
        y += row_h
    bar_h = max(3, size // 3)
    d.rectangle([pad, y + size // 2 - bar_h // 2, pad + bar_px, y + size // 2 + bar_h - bar_h // 2], fill=LEGEND_FG)
    d.text((pad + bar_px + 2 * pad, y), label, fill=LEGEND_FG, font=font)
    return np.asarray(img)


def qc_thumbnail(grid: TileGrid, ds: tuple[float, float], annotations=None, legend: bool = True) -> np.ndarray:
    """The QC picture: (h + legend, w, 3) uint8 RGB (see the module docstring).

    Args:
        grid: the tiler's output; its ``thumbnail`` and ``tissue_mask`` (h, w) are drawn on.
        ds: (x, y) level-0 px per thumbnail px.
        annotations: :class:`gigapath_core.masks.AnnotationMask` (level-0 px) or None.
        legend: append the legend band with the scale bar (False: the bare overlay, (h, w, 3)).
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    from ..masks import geometry_rings

    dsx, dsy = ds
    width = outline_width(grid.thumbnail.shape)
    img = grid.thumbnail.copy()
    edge = find_boundaries(grid.tissue_mask, mode="inner")
    if width > 1 and edge.any():  # thicken inwards: the outline stays on the tissue side
        edge = ndimage.binary_dilation(edge, iterations=width - 1) & grid.tissue_mask
    img[edge] = TISSUE_RGB
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    side_x = grid.tile_size * grid.target_mpp / grid.source_mpp[0] / dsx
    side_y = grid.tile_size * grid.target_mpp / grid.source_mpp[1] / dsy
    box_width = max(1, width // 2)
    rejected = rejected_cells(grid, ds)
    stride = int(grid.info.get("stride", grid.tile_size)) / grid.tile_size  # cell step / tile side
    for c, r in rejected:  # first, so kept tiles and outlines draw over them
        x0, y0 = c * side_x * stride, r * side_y * stride
        draw.rectangle([x0, y0, x0 + side_x, y0 + side_y], outline=REJECTED_RGB, width=1)

    def ring_line(xy: np.ndarray, colour) -> None:
        if len(xy) >= 2:
            draw.line([(float(x), float(y)) for x, y in xy], fill=colour, width=width, joint="curve")

    if annotations is not None:  # the region first: an exclusion inside it is a hole of the region too
        scale = np.array([1.0 / dsx, 1.0 / dsy])
        for ring in geometry_rings(annotations.region):
            ring_line(ring * scale, REGION_RGB)
        if not annotations.exclude.is_empty:
            for ring in geometry_rings(annotations.exclude):
                ring_line(ring * scale, EXCLUDED_RGB)
    for x, y in grid.coords:
        x0, y0 = x / dsx, y / dsy
        draw.rectangle([x0, y0, x0 + side_x, y0 + side_y], outline=TILE_RGB, width=box_width)
    overlay = np.asarray(pil)
    if not legend:
        return overlay
    occ = grid.info.get("min_occupancy", 0.1)
    entries = [(TISSUE_RGB, "tissue outline"), (TILE_RGB, f"kept tile ({len(grid.coords)})"),
               (REJECTED_RGB, f"not kept: occupancy < {occ:g}" + (" or outside the annotations" if annotations
                                                                  is not None else "") + f" ({len(rejected)})")]
    if annotations is not None:
        entries.append((REGION_RGB, "annotation region"))
        if not annotations.exclude.is_empty:
            entries.append((EXCLUDED_RGB, "excluded annotations"))
    band = legend_band(overlay.shape[1], entries, grid.source_mpp[0] * dsx)
    return np.concatenate([overlay, band], axis=0)
