"""Slide-level data views: coordinate augmentations of the slide MAE (Xu et al. 2024, Methods: slide encoder
(LongNet)), tile subsampling, and
padding slides of different lengths into one batch.

Coordinates are grid px at 0.5 µm/px (tile top-left corners, multiples of ``tile_size``); cell
``(floor(x / 256), floor(y / 256))`` must stay inside the ``n_cells`` x ``n_cells`` (1,000) position grid of
the LongNet slide encoder. Every random choice comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def row_major(cells: np.ndarray) -> np.ndarray:
    """Indices sorting (N, 2) cells (col, row) by row, then column (the tiler's order)."""
    return np.lexsort((cells[:, 0], cells[:, 1]))


def augment_slide(
    coords: np.ndarray,
    rng: np.random.Generator,
    *,
    crop_ratio: float = 0.875,
    flip_p: float = 0.5,
    shift: bool = True,
    tile_size: int = 256,
    n_cells: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """The slide-MAE input augmentations (Prov-GigaPath, Methods; Xu et al. 2024, Methods: slide encoder (LongNet)).

    1. grid crop: a random window of ``ceil(crop_ratio * extent)`` cells per axis inside the slide's tile
       extent; tiles outside are dropped (kept all if the window would hold none);
    2. horizontal flip with probability ``flip_p``: column ``c -> c_min + c_max - c`` (mirrored in place);
    3. random shift: a whole-cell translation drawn uniformly among those keeping every tile inside the
       ``n_cells`` grid (a slide wider than the grid is moved to the origin and cut at the border).

    Args:
        coords: (N, 2) grid px (x, y), N >= 1.
    Returns:
        (keep, new_coords): indices (M,) int64 of the kept input tiles in their new row-major order, and
        their (M, 2) float32 grid px coordinates (multiples of ``tile_size``).
    """
    cells = np.floor(np.asarray(coords, dtype=np.float64) / tile_size).astype(np.int64).reshape(-1, 2)
    keep = np.arange(len(cells))
    if crop_ratio < 1.0 and len(cells) > 1:
        lo, hi = cells.min(0), cells.max(0)
        size = hi - lo + 1
        win = np.maximum(1, np.ceil(crop_ratio * size).astype(np.int64))
        start = lo + np.array([rng.integers(0, s - w + 1) for s, w in zip(size, win)])
        inside = np.all((cells >= start) & (cells < start + win), axis=1)
        if inside.any():
            keep = keep[inside]
    c = cells[keep].copy()
    if rng.random() < flip_p:
        c[:, 0] = c[:, 0].min() + c[:, 0].max() - c[:, 0]
    if shift:
        lo, hi = c.min(0), c.max(0)
        offs = []
        for a in range(2):
            low, high = -int(lo[a]), n_cells - 1 - int(hi[a])
            offs.append(int(rng.integers(low, high + 1)) if low <= high else -int(lo[a]))
        c = c + np.array(offs)
        inside = np.all((c >= 0) & (c < n_cells), axis=1)
        keep, c = keep[inside], c[inside]
    order = row_major(c)
    return keep[order], (c[order] * tile_size).astype(np.float32)


def subsample(n: int, max_tiles: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted random subset of ``max_tiles`` of ``n`` indices (all if ``max_tiles`` is None or >= n)."""
    if max_tiles is None or n <= max_tiles:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_tiles, replace=False))


def random_mask(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) bool with ``round(ratio * n)`` True entries, at least 1 and at most n - 1 when n >= 2."""
    k = int(round(ratio * n))
    k = min(max(k, 1), n - 1) if n >= 2 else 0
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def pad_slides(items: list[dict], keys: tuple[str, ...] = ("features", "coords")) -> dict[str, torch.Tensor]:
    """Stack per-slide tensors of different lengths N_i into (B, max N, ...) with ``padding_mask`` (B, N)
    bool (True at padding). Per-tile bool keys (e.g. ``mask``) are padded with False."""
    n = max(int(it[keys[0]].shape[0]) for it in items)
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = torch.as_tensor(items[0][key])
        buf = torch.zeros((len(items), n, *first.shape[1:]), dtype=first.dtype)
        for b, it in enumerate(items):
            t = torch.as_tensor(it[key])
            buf[b, : t.shape[0]] = t
        out[key] = buf
    pad = torch.ones(len(items), n, dtype=torch.bool)
    for b, it in enumerate(items):
        pad[b, : int(it[keys[0]].shape[0])] = False
    out["padding_mask"] = pad
    return out


def sincos_2d(coords: torch.Tensor, dim: int, tile_size: int = 256) -> torch.Tensor:
    """Fixed 2-D sin-cos position of each tile's cell: concat(sincos_{dim/2}(col), sincos_{dim/2}(row)) with
    frequencies ``10000^(-k / (dim/4))``; (..., 2) grid px -> (..., dim) float32. ``dim`` divisible by 4."""
    if dim % 4:
        raise ValueError(f"sin-cos position width {dim} must be divisible by 4")
    cells = torch.floor(coords.float() / tile_size)
    q = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(q, dtype=torch.float32, device=coords.device) / q)
    parts = []
    for a in range(2):
        ang = cells[..., a : a + 1] * freq
        parts += [torch.sin(ang), torch.cos(ang)]
    return torch.cat(parts, dim=-1)
