"""Heatmap pictures: per-tile values painted over the slide thumbnail, with colorbar (units), legend, µm scale
bar and the tissue outline.

Every tile's cell covers exactly its footprint: level-0 rectangle ``[x, x + w) x [y, y + h)`` (``w, h`` = the
tile side in level-0 px) times the thumbnail scale ``thumb_w / level0_w``. Where tiles overlap, a pixel gets the
mean of the tiles covering it. Optional smoothing (``smooth`` > 0) blurs the painted values with a Gaussian of
``smooth`` tile sides, normalised by the blurred coverage so the slide's edge does not darken, and keeps the
result inside the tiled area: the idea of CLAM's overlapping-patch, blurred heatmaps (mahmoodlab/CLAM,
wsi_core/WholeSlideImage.py ``visHeatmap``), not its code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

#: candidate scale-bar lengths in µm
NICE_UM = (10, 20, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000, 20000)


@dataclass
class ColorScale:
    """How values map to colours: ``label`` is the colorbar text with its unit."""

    values: np.ndarray  # (N,) values actually painted
    vmin: float
    vmax: float
    label: str
    cmap: str = "magma"


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """(N,) -> (N,) float32 percentile rank in 0..100 (ties share their mean rank; one tile -> 100)."""
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=np.float64)
    if len(v) <= 1:
        return np.full(len(v), 100.0, dtype=np.float32)
    return ((rankdata(v) - 1) / (len(v) - 1) * 100).astype(np.float32)


def attention_scale(attention: np.ndarray, mode: str = "percentile") -> ColorScale:
    """Colour scale of attention weights: ``percentile`` (rank within the slide, 0-100 %, CLAM's default view)
    or ``ratio`` (weight x number of tiles: 1 = uniform attention)."""
    a = np.asarray(attention, dtype=np.float64)
    if mode == "percentile":
        return ColorScale(percentile_rank(a), 0.0, 100.0, "attention: percentile rank among this slide's tiles (%)")
    if mode == "ratio":
        r = (a * len(a)).astype(np.float32)
        return ColorScale(r, 0.0, float(max(np.percentile(r, 99), 1.0)) if len(r) else 1.0,
                          "attention: softmax weight × N tiles (1 = uniform)")
    raise ValueError(f"unknown attention scale {mode!r} (percentile or ratio)")


def score_scale(scores: np.ndarray, class_name: str, unit: str) -> ColorScale:
    """Colour scale of one class's tile scores: probabilities on 0..1, cosine similarities on their range."""
    s = np.asarray(scores, dtype=np.float32)
    if unit.startswith("cosine"):
        lo, hi = (float(s.min()), float(s.max())) if len(s) else (-1.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 1e-3, hi + 1e-3
        return ColorScale(s, lo, hi, f"{class_name}: cosine similarity to the class prompts", "viridis")
    return ColorScale(s, 0.0, 1.0, f"P({class_name}) of the tile alone (probability, 0-1)", "viridis")


def snap_to_grid(coords: np.ndarray, tile_side: tuple[float, float]) -> np.ndarray:
    """(N, 2) float64 level-0 corners; a corner within half a px of a multiple of the (fractional) tile side is
    moved onto it. The tiler rounds ``col * side`` to whole level-0 px (units.grid_index_to_level0), so
    neighbours overlap or gap by < 1 px; snapped corners tile the plane exactly. Off-grid corners stay."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    side = np.asarray(tile_side, dtype=np.float64)
    exact = np.rint(c / side) * side
    return np.where(np.abs(exact - c) <= 0.5 + 1e-6, exact, c)


def paint_overlay(values: np.ndarray, coords: np.ndarray, tile_side: tuple[float, float],
                  scale: tuple[float, float], shape: tuple[int, int], smooth: float = 0.0) -> np.ndarray:
    """Per-tile values as an (H, W) float32 image, NaN where no tile lies.

    Args:
        values: (N,) one value per tile.
        coords: (N, 2) level-0 px top-left (x, y) of each tile.
        tile_side: (w, h) of a tile in level-0 px.
        scale: (sx, sy) output px per level-0 px.
        shape: (H, W) of the output.
        smooth: Gaussian sigma in tile sides (0 = none).
    Cell of tile i: columns ``round(x'*sx) .. round((x'+w)*sx) - 1``, rows likewise (at least one px), with
    ``x'`` the corner snapped to the tile grid (:func:`snap_to_grid`): the tile's level-0 square x the scale to
    within half an output px plus half a level-0 px; neighbouring grid tiles share an edge, no seam, no gap.
    """
    h, w = shape
    acc = np.zeros((h, w), dtype=np.float64)
    cnt = np.zeros((h, w), dtype=np.float64)
    c = snap_to_grid(coords, tile_side)
    x0 = np.rint(c[:, 0] * scale[0]).astype(int)
    y0 = np.rint(c[:, 1] * scale[1]).astype(int)
    x1 = np.maximum(np.rint((c[:, 0] + tile_side[0]) * scale[0]).astype(int), x0 + 1)
    y1 = np.maximum(np.rint((c[:, 1] + tile_side[1]) * scale[1]).astype(int), y0 + 1)
    for v, a, b, cc, d in zip(np.asarray(values, dtype=np.float64), x0, y0, x1, y1):
        a, b, cc, d = max(a, 0), max(b, 0), min(cc, w), min(d, h)
        if a < cc and b < d:
            acc[b:d, a:cc] += v
            cnt[b:d, a:cc] += 1
    covered = cnt > 0
    if smooth > 0 and covered.any():
        from scipy.ndimage import gaussian_filter

        sigma = (smooth * tile_side[1] * scale[1], smooth * tile_side[0] * scale[0])
        mean = np.where(covered, acc / np.maximum(cnt, 1), 0.0)
        num = gaussian_filter(mean, sigma)
        den = gaussian_filter(covered.astype(np.float64), sigma)
        out = np.where(covered, num / np.maximum(den, 1e-12), np.nan)
    else:
        out = np.where(covered, acc / np.maximum(cnt, 1), np.nan)
    return out.astype(np.float32)


def scale_bar_um(um_per_px: float, width_px: int, fraction: float = 0.2) -> float:
    """The largest 'nice' length (µm) whose bar is at most ``fraction`` of the image width."""
    best = NICE_UM[0]
    for um in NICE_UM:
        if um / um_per_px <= fraction * width_px:
            best = um
    return float(best)


def tissue_rings(geojson: dict | None) -> list[np.ndarray]:
    """Every ring (exterior and holes) of the Polygon/MultiPolygon features of a GeoJSON, (M, 2) level-0 px."""
    rings = []
    for f in (geojson or {}).get("features", []):
        g = f.get("geometry") or {}
        polys = [g.get("coordinates", [])] if g.get("type") == "Polygon" else (
            g.get("coordinates", []) if g.get("type") == "MultiPolygon" else [])
        for poly in polys:
            rings += [np.asarray(r, dtype=np.float64) for r in poly if len(r) >= 2]
    return rings


def draw_heatmap(thumbnail: np.ndarray, overlay: np.ndarray, cs: ColorScale, *, scale: tuple[float, float],
                 mpp: tuple[float, float], title: str, tissue: list[np.ndarray] = (), alpha: float = 0.55,
                 note: str = "") -> bytes:
    """PNG bytes: ``thumbnail`` (H, W, 3) uint8 with ``overlay`` (H, W) coloured by ``cs``, a colorbar with its
    unit, a legend, a µm scale bar (from ``mpp`` and ``scale``) and the tissue outline (level-0 rings)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    h, w = overlay.shape
    dpi = 100
    right, top, bottom = 250, 44, 30 if note else 12
    fw, fh = w + right + 16, h + top + bottom
    fig = Figure(figsize=(fw / dpi, fh / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((8 / fw, bottom / fh, w / fw, h / fh))
    ax.imshow(thumbnail, interpolation="nearest")
    masked = np.ma.masked_invalid(overlay)
    im = ax.imshow(masked, cmap=cs.cmap, vmin=cs.vmin, vmax=cs.vmax, alpha=alpha, interpolation="nearest")
    lw = max(0.8, max(h, w) / 1400)
    for ring in tissue:  # a thin cyan line on a faint white halo: visible over dark tissue and white glass
        xs, ys = ring[:, 0] * scale[0] - 0.5, ring[:, 1] * scale[1] - 0.5
        ax.plot(xs, ys, color="white", lw=lw * 2.2, alpha=0.6, solid_capstyle="round")
        ax.plot(xs, ys, color="#00b7ff", lw=lw, solid_capstyle="round")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    um_per_px = mpp[0] / scale[0]
    um = scale_bar_um(um_per_px, w)
    label = f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"
    fs = max(9, min(16, w / 110))
    ax.add_artist(AnchoredSizeBar(ax.transData, um / um_per_px, label, "lower left", pad=0.5, sep=4,
                                  color="black", frameon=True, size_vertical=max(2, h / 250),
                                  fontproperties={"size": fs}))
    cax = fig.add_axes(((w + 30) / fw, bottom / fh + 0.35 * h / fh, 22 / fw, 0.6 * h / fh))
    cb = fig.colorbar(im, cax=cax)
    cb.solids.set_alpha(1)
    cb.set_label(cs.label, fontsize=fs * 0.85)
    cb.ax.tick_params(labelsize=fs * 0.8)
    handles = [Line2D([], [], color="#00b7ff", lw=2, path_effects=None, label="tissue outline"),
               Patch(facecolor=matplotlib.colormaps[cs.cmap](0.75), alpha=alpha, label="scored tile"),
               Patch(facecolor="none", edgecolor="0.6", label="no tile (background,\nbelow occupancy)")]
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=((w + 20) / fw, bottom / fh),
               fontsize=fs * 0.8, frameon=False)
    fig.text(8 / fw, 1 - 10 / fh, title, ha="left", va="top", fontsize=fs * 1.05, wrap=True)
    if note:
        fig.text(8 / fw, 8 / fh, note, ha="left", va="bottom", fontsize=fs * 0.75, color="#a00")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
