"""Fixed 2-D sin-cos position embedding of the Prov-GigaPath slide encoder, computed only for the cells present.

The released model adds to each tile embedding row ``floor(x/256) * 1000 + floor(y/256) + 1`` of a fixed
1,000,001 x D sin-cos table (row 0, all zeros, is the CLS position) (Xu et al. 2024, Methods: slide encoder
(LongNet)). Row ``i * 1000 + j + 1`` is
``concat(sincos_{D/2}(j), sincos_{D/2}(i))`` with ``sincos_m(p) = concat(sin(p * w), cos(p * w))`` and
``w_k = 10000 ** (-k / (m/2))``, ``k = 0 .. m/2 - 1`` (MAE's 2-D sin-cos embedding). Here ``i`` is the
column cell ``floor(x / tile_size)`` and ``j`` the row cell ``floor(y / tile_size)``.

The reference materialises the whole table (2.86 GiB in float32). This module computes the per-axis 1-D
tables (``ngrids`` x D/2, in float64, then rounded to float32 exactly like the reference's float32 buffer) and
gathers the two halves for the tiles given. Coordinates outside the grid raise :class:`ConfigError` (the
reference silently reads a wrong row or wraps around).
"""

from __future__ import annotations

import torch

from gigapath_core.errors import ConfigError

__all__ = ["sincos_1d", "coords_to_cells", "position_index", "position_embedding"]


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D sin-cos embedding.

    Args:
        positions: (M,) positions (any real dtype; computed in float64).
        dim: output width, even.
    Returns:
        (M, dim) float64: ``[sin(p * w_0..w_{dim/2-1}), cos(p * w_0..w_{dim/2-1})]``, ``w_k = 10000^(-2k/dim)``.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000.0**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def coords_to_cells(coords: torch.Tensor, tile_size: int = 256, ngrids: int = 1000,
                    padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Grid px (x, y) -> position cells (col, row) = (floor(x / tile_size), floor(y / tile_size)).

    Args:
        coords: (B, N, 2) float or int grid px at 0.5 µm/px (Xu et al. 2024, Methods: Preprocessing WSIs).
        padding_mask: (B, N) bool, True where the position is padding (not checked, cell 0 returned).
    Returns:
        (B, N, 2) int64 cells, each in ``[0, ngrids)``.
    Raises:
        ConfigError (key ``coords``): a coordinate is not finite or lies outside the ``ngrids x ngrids`` grid;
            the message names the slide, the tile and the coordinate.
    """
    if coords.dim() != 3 or coords.shape[-1] != 2:
        raise ConfigError("coords", f"expected shape (B, N, 2) grid px, got {tuple(coords.shape)}")
    c = coords.detach().to(torch.float64)
    cells = torch.floor(c / float(tile_size))
    bad = ~torch.isfinite(c).all(-1) | (cells < 0).any(-1) | (cells >= ngrids).any(-1)
    if padding_mask is not None:
        bad &= ~padding_mask.to(torch.bool)
    if bool(bad.any()):
        b, n = (int(v) for v in torch.nonzero(bad)[0])
        x, y = (float(v) for v in c[b, n])
        limit = tile_size * ngrids
        raise ConfigError(
            "coords",
            f"tile {n} of slide {b} at grid px (x={x:g}, y={y:g}) lies outside the {ngrids} x {ngrids} position "
            f"grid of {tile_size}-px cells (need 0 <= x, y < {limit}, in px at 0.5 um/px; "
            f"{int(bad.sum())} tile(s) affected; level-0 px of a 0.25 um/px scan are twice too large)",
        )
    cells = cells.to(torch.int64)
    if padding_mask is not None:
        cells = cells.masked_fill(padding_mask.to(torch.bool)[..., None], 0)
    return cells


def position_index(cells: torch.Tensor, ngrids: int = 1000) -> torch.Tensor:
    """Row of the reference's full table for each cell: ``col * ngrids + row + 1`` (0 is the CLS row).

    Args:
        cells: (..., 2) int64 (col, row) from :func:`coords_to_cells`.
    Returns:
        (...) int64.
    """
    return cells[..., 0] * ngrids + cells[..., 1] + 1


def position_embedding(cells: torch.Tensor, embed_dim: int, ngrids: int = 1000,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sin-cos position embedding of each tile, equal to the reference table's rows (float32 values).

    Args:
        cells: (B, N, 2) int64 (col, row) cells.
        embed_dim: D, divisible by 4.
        dtype: output dtype; values are the float32-rounded table entries (as the reference's buffer), cast.
    Returns:
        (B, N, D) tensor of ``dtype`` on ``cells.device``: ``concat(sincos_{D/2}(row), sincos_{D/2}(col))``.
    Memory: two ngrids x D/2 tables plus the output; never the ngrids^2 x D table.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    half = embed_dim // 2
    axis = sincos_1d(torch.arange(ngrids, device=cells.device), half).to(torch.float32)
    out = torch.cat([axis[cells[..., 1]], axis[cells[..., 0]]], dim=-1)
    return out.to(dtype)
