"""Top-k and bottom-k tiles of a slide by a score, read again from the slide at full resolution (level 0) and
captioned with their rank, score and level-0 (x, y), the pixel coordinates slide viewers (QuPath...) show for
the cursor, so each tile can be found again."""

from __future__ import annotations

import io

import numpy as np


def top_bottom(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest values (highest first) and the ``k`` lowest (lowest first); ties keep tile
    order. With fewer than 2k tiles the two lists overlap."""
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(-v, kind="stable")
    k = min(int(k), len(v))
    return order[:k], np.argsort(v, kind="stable")[:k]


def read_tiles(wsi, coords: np.ndarray, side: tuple[float, float], display: int = 256) -> list[np.ndarray]:
    """Each tile's level-0 rectangle ``(x, y, ceil(w), ceil(h))`` read at level 0 (full resolution), then
    resized to ``display`` px (Lanczos) for the montage: list of (display, display, 3) uint8."""
    from PIL import Image

    size = (int(np.ceil(side[0])), int(np.ceil(side[1])))
    out = []
    for x, y in np.asarray(coords, dtype=np.int64).reshape(-1, 2):
        img = wsi.read_region((int(x), int(y)), 0, size)
        out.append(np.asarray(Image.fromarray(img).resize((display, display), Image.Resampling.LANCZOS)))
    return out


def draw_montage(rows: list[tuple[str, list[np.ndarray], list[str]]], title: str, tile_um: float) -> bytes:
    """PNG bytes of a grid: one row per ``(row label, images, captions)``; ``tile_um`` (the tile side in µm)
    goes into the title so the magnification is known."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncol = max(1, max(len(r[1]) for r in rows))
    cell, cap, lab, top = 2.2, 0.55, 0.35, 0.55
    fig = Figure(figsize=(ncol * cell + 0.2, len(rows) * (cell + cap + lab) + top), dpi=100, facecolor="white")
    FigureCanvasAgg(fig)
    H = fig.get_figheight()
    W = fig.get_figwidth()
    fig.text(0.1 / W, 1 - 0.12 / H, f"{title}  (each tile {tile_um:.0f} µm wide, read at level 0)", ha="left",
             va="top", fontsize=11)
    for r, (label, images, captions) in enumerate(rows):
        y_top = H - top - r * (cell + cap + lab)
        fig.text(0.1 / W, (y_top - 0.05) / H, label, ha="left", va="top", fontsize=10, weight="bold")
        for c, (img, text) in enumerate(zip(images, captions)):
            ax = fig.add_axes(((0.1 + c * cell + 0.05) / W, (y_top - lab - cell + 0.05) / H,
                               (cell - 0.1) / W, (cell - 0.1) / H))
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(0.5, -0.03, text, transform=ax.transAxes, ha="center", va="top", fontsize=7.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
