"""The QC thumbnail: kept and rejected tiles in their colours, a legend and a µm scale bar (issue #13 item 2)."""

from __future__ import annotations

import numpy as np
import pytest

from gigapath_core.api import build
from gigapath_core.stages.qc import (LEGEND_FG, REJECTED_RGB, TILE_RGB, cell_occupancy, legend_band, nice_scale_um,
                                     qc_thumbnail, rejected_cells)
from gigapath_core.stages.tiling import open_slide


@pytest.fixture(scope="module")
def cmu_grid(example_slide):
    with open_slide(str(example_slide), ["openslide"]) as wsi:
        grid = build("tiler", "otsu").tile(wsi)
        level0 = tuple(wsi.level_dimensions[0])
    return grid, (level0[0] / grid.tissue_mask.shape[1], level0[1] / grid.tissue_mask.shape[0])


def test_cell_occupancy_equals_a_brute_force_count():
    rng = np.random.default_rng(0)
    mask = rng.random((97, 131)) > 0.6
    side = (131 / 9, 97 / 7)
    occ = cell_occupancy(mask, side, 9, 7)
    for r in range(7):
        for c in range(9):
            y0, y1 = round(r * side[1]), round((r + 1) * side[1])
            x0, x1 = round(c * side[0]), round((c + 1) * side[0])
            assert occ[r, c] == pytest.approx(mask[y0:y1, x0:x1].mean())


def test_rejected_tiles_are_the_cells_with_tissue_that_were_not_kept(cmu_grid):
    grid, ds = cmu_grid
    rejected = {tuple(c) for c in rejected_cells(grid, ds)}
    kept = {tuple(c) for c in grid.grid_coords // grid.tile_size}
    assert len(kept) == 49 and len(rejected) == 8 and not (rejected & kept)
    side0 = grid.tile_size * grid.target_mpp / grid.source_mpp[0]
    occ = cell_occupancy(grid.tissue_mask, (side0 / ds[0], side0 / ds[1]), grid.info["grid_cols"],
                         grid.info["grid_rows"])
    with_tissue = {(c, r) for r, c in zip(*np.nonzero(occ > 0))}
    assert with_tissue == kept | rejected
    assert all(occ[r, c] < 0.1 for c, r in rejected)


def test_picture_has_both_tile_colours_a_legend_and_a_true_scale_bar(cmu_grid):
    grid, ds = cmu_grid
    img = qc_thumbnail(grid, ds)
    h, w = grid.thumbnail.shape[:2]
    assert img.shape[1] == w and img.shape[0] > h + 20  # the legend band below the picture
    overlay = img[:h]
    assert (overlay == TILE_RGB).all(-1).sum() > 1000 and (overlay == REJECTED_RGB).all(-1).sum() > 100
    band = img[h:]
    um_per_px = grid.source_mpp[0] * ds[0]
    bar_um = nice_scale_um(w * um_per_px)
    def longest_run(row: np.ndarray) -> int:
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        return int((np.nonzero(edges == -1)[0] - np.nonzero(edges == 1)[0]).max(initial=0))

    bar_px = max(longest_run(r) for r in (band == LEGEND_FG).all(-1))
    assert bar_px == pytest.approx(bar_um / um_per_px, abs=1.5)  # the bar is bar_um µm long on the slide
    np.testing.assert_array_equal(qc_thumbnail(grid, ds, legend=False), overlay)


@pytest.mark.parametrize("width_um, bar", [(1000, 200), (2220 * 0.5, 200), (40_000, 5000), (3.3, 0.5)])
def test_scale_bar_lengths_are_round(width_um, bar):
    assert nice_scale_um(width_um) == bar


def test_legend_wraps_long_entries_onto_more_rows():
    one = legend_band(800, [((0, 0, 0), "a")], 1.0)
    many = legend_band(300, [((0, 0, 0), f"entry number {i}") for i in range(6)], 1.0)
    assert many.shape[0] > one.shape[0] and many.shape[1] == 300
