"""Otsu tiler options users expect (issue #12 item 7): ``edge_tiles: pad`` and ``stride`` (overlap)."""

from __future__ import annotations

import numpy as np
import pytest

from gigapath_core.api import build
from gigapath_core.config import load_pipeline_config
from gigapath_core.errors import ConfigError
from gigapath_core.stages.tiling import open_slide
from test_tiler import ArrayWSI

SIDE0 = 256 * 0.5 / 0.499  # level-0 px per tile on CMU-1-Small-Region (0.499 µm/px)


def _tile(path, **params):
    with open_slide(str(path), ["openslide"]) as wsi:
        return build("tiler", "otsu", **params).tile(wsi)


def test_pad_tiles_the_strip_at_the_slide_edge(example_slide):
    """2220 x 2967 px: 8 x 11 whole tiles leave a 168-px strip at the right and a 145-px strip at the bottom
    (2967 - 11 x 256.5); ``pad`` adds a 9th column and a 12th row, and the bottom strip holds tissue."""
    drop, pad = _tile(example_slide), _tile(example_slide, edge_tiles="pad")
    assert (drop.info["grid_cols"], drop.info["grid_rows"]) == (8, 11) and drop.info["edge_tiles"] == "drop"
    assert (pad.info["grid_cols"], pad.info["grid_rows"]) == (9, 12)
    bottom = pad.grid_coords[:, 1] == 11 * 256
    assert bottom.sum() >= 1  # the 145-px strip of tissue is tiled
    # the tiles inside the slide are the same tiles with the same occupancy
    inner = (pad.grid_coords[:, 0] < 8 * 256) & (pad.grid_coords[:, 1] < 11 * 256)
    np.testing.assert_array_equal(pad.grid_coords[inner], drop.grid_coords)
    np.testing.assert_allclose(pad.occupancy[inner], drop.occupancy, atol=1e-6)
    # an edge tile's occupancy counts the padding as no tissue: at most 145 / 256.5 of the tile
    assert (pad.occupancy[bottom] <= (2967 - 11 * SIDE0) / SIDE0 + 0.01).all()
    assert (pad.coords[bottom, 1] == round(11 * SIDE0)).all()


def test_pad_reads_white_past_the_edge():
    tissue = np.full((600, 300, 3), 255, np.uint8)
    tissue[:300, :, 1] = 60  # the top 300 x 300 px are tissue, the rest background
    wsi = ArrayWSI([tissue], (0.5, 0.5))
    opts = dict(min_area_um2=0, min_occupancy=0.01, median_size=1)
    drop = build("tiler", "otsu", **opts).tile(wsi)
    pad = build("tiler", "otsu", edge_tiles="pad", **opts).tile(wsi)
    assert drop.grid_coords.tolist() == [[0, 0], [0, 256]]
    assert pad.grid_coords.tolist() == [[0, 0], [256, 0], [0, 256], [256, 256]]
    # 44 x 256, 256 x 44 and 44 x 44 px of the 256 x 256 px tiles are tissue (the rest: background or padding)
    np.testing.assert_allclose(pad.occupancy, [1.0, 44 / 256, 44 / 256, (44 / 256) ** 2], atol=0.01)
    img = wsi.read_region(tuple(int(v) for v in pad.coords[1]), 0, (256, 256))
    assert (img[:, 44:] == 255).all()  # padded with white


def test_stride_overlaps_tiles_on_synthetic_tissue():
    tissue = np.full((1536, 1024, 3), 255, np.uint8)
    tissue[:1024, :, 1] = 60  # 1024 x 1024 px of tissue above 512 rows of background
    wsi = ArrayWSI([tissue], (0.5, 0.5))
    grid = build("tiler", "otsu", min_area_um2=0, median_size=1, stride=128).tile(wsi)
    # (1024 - 256) / 128 + 1 = 7 columns, (1536 - 256) / 128 + 1 = 11 rows, every 128 px, each tile 256 px
    assert (grid.info["grid_cols"], grid.info["grid_rows"], grid.info["stride"]) == (7, 11, 128)
    assert sorted(set(grid.grid_coords[:, 0].tolist())) == list(range(0, 769, 128))
    np.testing.assert_array_equal(grid.coords, grid.grid_coords)  # 0.5 µm/px slide: level 0 = grid px
    by_row = {}
    for (x, y), o in zip(grid.grid_coords.tolist(), grid.occupancy.tolist()):
        by_row.setdefault(y, []).append(o)
    assert sorted(by_row) == list(range(0, 897, 128))  # rows from 1024 on hold no tissue
    assert all(len(v) == 7 for v in by_row.values())
    np.testing.assert_allclose(by_row[768], 1.0, atol=1e-6)
    np.testing.assert_allclose(by_row[896], 0.5, atol=0.01)  # half the tile (the mask is 2/3 scale)


def test_stride_occupancy_of_a_half_tissue_slide():
    tissue = np.full((512, 512, 3), 255, np.uint8)
    tissue[:, :256, 1] = 60  # left half tissue
    wsi = ArrayWSI([tissue], (0.5, 0.5))
    grid = build("tiler", "otsu", min_area_um2=0, min_occupancy=0.0, stride=128, median_size=1).tile(wsi)
    occ = {int(x): float(o) for (x, y), o in zip(grid.grid_coords, grid.occupancy) if y == 0}
    assert occ == pytest.approx({0: 1.0, 128: 0.5, 256: 0.0}, abs=0.02)


def test_stride_with_a_slide_encoder_is_refused(example_slide, tmp_path):
    raw = {"inputs": {"slides": [str(example_slide)]}, "tiler": {"name": "otsu", "params": {"stride": 128}},
           "tile_encoder": {"name": "dinov2-vits14", "weights": "random"},
           "slide_encoder": {"name": "mean"}}
    with pytest.raises(ConfigError, match=r"^tiler\.params\.stride: 128 px \(tile_size 256\) gives tiles off the "
                                          r"slide encoder's 256-px position grid"):
        load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))
    raw.pop("slide_encoder")  # tile embeddings of overlapping tiles: fine
    cfg, _ = load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))
    assert cfg.tiler.params == {"stride": 128}
    raw["tiler"]["params"] = {"stride": 256}  # = tile_size: the default grid
    raw["slide_encoder"] = {"name": "mean"}
    assert load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))[0].slide_encoder.params == {"in_dim": 384}


def test_qc_rejected_tiles_follow_the_stride():
    from gigapath_core.stages.qc import rejected_cells

    tissue = np.full((512, 512, 3), 255, np.uint8)
    tissue[:, :256, 1] = 60  # left half tissue: tiles at x = 0 (all tissue), 128 (half), 256 (none)
    wsi = ArrayWSI([tissue], (0.5, 0.5))
    grid = build("tiler", "otsu", min_area_um2=0, min_occupancy=0.75, stride=128, median_size=1).tile(wsi)
    assert sorted(set(grid.grid_coords[:, 0].tolist())) == [0]
    ds = (grid.mask_downsample, grid.mask_downsample)
    # the half-tissue column (index 1, at 128 px) is the one with tissue that was not kept
    assert sorted(set(rejected_cells(grid, ds)[:, 0].tolist())) == [1]


def test_tile_embeddings_of_overlapping_tiles_are_refused_by_readers(tmp_path):
    """An embed run without a slide encoder may write overlapping tiles; reading them for a slide encoder
    (finetune, inputs.features) fails with the reason instead of a confusing grid error."""
    import gigapath_core as gp
    from gigapath_core.errors import FeatureFileError
    from gigapath_core.interop import read_tile_features
    from gigapath_core.store import read_h5

    tissue = np.full((768, 768, 3), 255, np.uint8)
    tissue[:512, :512, 1] = 60
    slide = tmp_path / "s.tif"
    import tifffile

    tifffile.imwrite(slide, tissue, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 µm/px
    tiny = {"name": "dinov2_vit", "weights": "random", "batch_size": 8,
            "params": {"model_name": "vit_small_patch14_dinov2", "img_size": 28,
                       "model_kwargs": {"depth": 1, "embed_dim": 24, "num_heads": 2}}}
    cfg = {"inputs": {"slides": [str(slide)], "mpp": 0.5}, "readers": ["tifffile"],
           "tiler": {"name": "otsu", "params": {"stride": 128, "min_area_um2": 0, "median_size": 1}},
           "tile_encoder": tiny}
    assert gp.run(cfg, out=str(tmp_path / "out")) == 0
    data, _ = read_h5(tmp_path / "out" / "s" / "tile_embeddings.h5")
    assert (data["grid_coords"] % 128 == 0).all() and (data["grid_coords"] % 256 != 0).any()
    with pytest.raises(FeatureFileError, match=r"its tiles overlap \(tiler stride 128 px, tile_size 256\)"):
        read_tile_features(tmp_path / "out" / "s" / "tile_embeddings.h5")
