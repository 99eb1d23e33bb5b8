"""Bounded thumbnail/mask work (issue #11 items 4 and 7) and the speck filter (issue #17 item 6).

- A crafted single-level 200,000 x 200,000 px tiled TIFF (7 MB: one stored tile, every other tile empty) must
  fail with PixelBudgetError within a hard timeout, while the other slide of the same run finishes.
- The mask is at least 4 px per tile side on a big slide: a procedural 300,000-px-wide pyramid (sparse tissue
  discs whose exact geometry is known) keeps no blank-glass tile, where the old 1,024-px mask keeps several.
- Specks: CMU-1-Small-Region's tissue.geojson drops from 49 polygons to 20, its kept tiles unchanged.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import shapely

from gigapath_core.api import build
from gigapath_core.errors import PixelBudgetError
from gigapath_core.kinds import WSI
from gigapath_core.stages.tiling import open_slide, run_tiling
from gigapath_plugins.tilers.otsu import mask_long_side

ROOT = Path(__file__).resolve().parent.parent


def crafted_huge_tiff(path: Path, side: int = 200_000) -> Path:
    """Single-level ``side`` x ``side`` RGB BigTIFF, 256-px zlib tiles, 0.25 µm/px; only the first tile is stored
    (white), every other tile has byte count 0 — written in about a second, a few MB on disk."""
    import tifffile

    n = (-(-side // 256)) ** 2
    blank = zlib.compress(np.full((256, 256, 3), 255, np.uint8).tobytes())

    def tiles():
        yield blank
        for _ in range(n - 1):
            yield b""

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(256, 256), compression="zlib",
                     bigtiff=True, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER")
    return path


def test_crafted_huge_single_level_tiff_fails_fast_and_alone(tmp_path, example_slide):
    big = crafted_huge_tiff(tmp_path / "huge.tif")
    assert big.stat().st_size < 12_000_000
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"inputs": {"slides": [str(big), str(example_slide)]}}))
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gigapath_core.cli", "run", str(cfg), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert time.monotonic() - t0 < 120
    assert proc.returncode == 1, proc.stderr[-2000:]
    with open(out / "manifest.csv") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert rows["CMU-1-Small-Region"]["status"] == "ok" and int(rows["CMU-1-Small-Region"]["n_tiles"]) > 0
    row = rows["huge"]
    assert (row["status"], row["error_type"]) == ("failed", "PixelBudgetError")
    assert row["reason"].startswith(f"{big}: the 1563 x 1563 px mask thumbnail would decode its only level, "
                                    "200,000 x 200,000 px = 40,000 Mpx, over the decode budget of 1,024 Mpx "
                                    "(tiler.params.max_decode_mpx)")


def test_budget_is_checked_before_any_pixel_is_read(tmp_path):
    class Huge(WSI):
        path, reader = "huge.svs", "test"
        level_dimensions = property(lambda self: [(200_000, 100_000), (50_000, 25_000)])
        level_downsamples = property(lambda self: [1.0, 4.0])
        mpp = property(lambda self: (0.25, 0.25))

        def read_region(self, location, level, size):
            raise AssertionError("decoded pixels despite the budget")

    with pytest.raises(PixelBudgetError, match=r"smallest level big enough \(level 1 of 2\), 50,000 x 25,000 px = "
                                               r"1,250 Mpx, over the decode budget of 1,024 Mpx"):
        build("tiler", "otsu").tile(Huge())


def test_mask_size_rule():
    # 300,000 px wide at 0.25 µm/px: 512-px tiles, 586 along the long side -> 2,344 px (4 per tile)
    assert mask_long_side((300_000, 60_000), (512, 512), 1024, 4, 8192) == 2344
    assert mask_long_side((2220, 2967), (256.5, 256.5), 1024, 4, 8192) == 1024  # small slide: unchanged
    assert mask_long_side((3_000_000, 10), (512, 512), 1024, 4, 8192) == 8192  # capped


class DiscSlide(WSI):
    """Procedural 300,000 x 24,000 px slide at 0.25 µm/px, levels 1x/4x/16x/64x: pink discs on white glass."""

    path, reader = "discs", "test"

    def __init__(self, centres: np.ndarray, radius: float):
        self.centres, self.radius = centres.astype(np.float64), float(radius)

    level_dimensions = property(lambda self: [(300_000 // d, 24_000 // d) for d in (1, 4, 16, 64)])
    level_downsamples = property(lambda self: [1.0, 4.0, 16.0, 64.0])
    mpp = property(lambda self: (0.25, 0.25))

    def read_region(self, location, level, size):
        ds = self.level_downsamples[level]
        xs = location[0] + (np.arange(size[0]) + 0.5) * ds
        ys = location[1] + (np.arange(size[1]) + 0.5) * ds
        inside = np.zeros((size[1], size[0]), bool)
        for cx, cy in self.centres:
            dx2 = (xs - cx) ** 2
            rows = np.flatnonzero(np.abs(ys - cy) <= self.radius)
            if len(rows):
                inside[rows] |= (dx2[None, :] + (ys[rows, None] - cy) ** 2) <= self.radius**2
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        out[inside] = (200, 80, 150)
        return out


def test_no_blank_tile_on_a_big_slide():
    rng = np.random.default_rng(0)
    centres = np.stack([rng.uniform(2_000, 298_000, 100), rng.uniform(2_000, 22_000, 100)], 1)
    radius = 200.0  # 100 µm wide discs (7,854 µm², above the speck filter), about half a 512-px tile
    wsi = DiscSlide(centres, radius)
    discs = shapely.union_all([shapely.Point(c).buffer(radius, 64) for c in centres])
    side = 512.0

    def tissue_in_kept_tiles(grid):
        o = grid.grid_coords / 256 * side
        boxes = shapely.box(o[:, 0], o[:, 1], o[:, 0] + side, o[:, 1] + side)
        return shapely.area(shapely.intersection(boxes, discs)) / side**2

    fine = build("tiler", "otsu", median_size=1).tile(wsi)
    assert fine.tissue_mask.shape[1] == 2344 and fine.info["mask_px_per_tile"] >= 4
    frac = tissue_in_kept_tiles(fine)
    assert len(fine) >= 100 and (frac > 0.01).all()
    # the old rule (1,024-px mask: 1.7 mask px per tile) keeps blank glass on the same slide
    coarse = build("tiler", "otsu", median_size=1, mask_px_per_tile=1).tile(wsi)
    assert coarse.tissue_mask.shape[1] == 1024
    assert (tissue_in_kept_tiles(coarse) == 0).sum() >= 5  # 9 of 192 with this seed


def test_specks_dropped_on_cmu(tmp_path, example_slide):
    """45 of the 49 tissue polygons are < 1,000 µm² (issue #17); the default filter leaves 20 (fragments within
    2 mask px of each other count together, see remove_specks) and the same 49 tiles."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "clean").mkdir()
    with open_slide(str(example_slide), ["openslide"]) as wsi:
        raw = run_tiling(build("tiler", "otsu", min_area_um2=0), wsi, tmp_path / "raw", None, {})
        cleaned = run_tiling(build("tiler", "otsu"), wsi, tmp_path / "clean", None, {})
    n_raw = len(json.loads((tmp_path / "raw" / "tissue.geojson").read_text())["features"])
    n_clean = len(json.loads((tmp_path / "clean" / "tissue.geojson").read_text())["features"])
    assert (n_raw, n_clean) == (49, 20)
    np.testing.assert_array_equal(raw.coords, cleaned.coords)
    assert cleaned.tissue_mask.sum() < raw.tissue_mask.sum()
    assert not (cleaned.tissue_mask & ~raw.tissue_mask).any()  # only removes


def test_jpeg_thumbnail_uses_shrink_on_load(tmp_path, example_slide):
    """A plain JPEG has one level; libvips decodes it at 1/4 scale for a 1,024-px thumbnail (16x fewer px), the
    tiler's budget counts that, and the thumbnail matches a box downsample of the full image."""
    from PIL import Image

    with open_slide(str(example_slide), ["openslide"]) as wsi:
        full = Image.fromarray(wsi.read_region((0, 0), 0, (2220, 2967))).resize((4440, 5934))
    full.save(tmp_path / "big.jpg", quality=92)
    wsi = build("slide_reader", "pyvips").open(str(tmp_path / "big.jpg"))
    assert wsi.level_dimensions == [(4440, 5934)]
    assert wsi.thumbnail_cost((766, 1024)) == (0, 4440 * 5934 // 16)
    thumb = wsi.thumbnail(1024)
    ref = np.asarray(full.resize((766, 1024), Image.Resampling.BOX)).astype(np.float32)
    assert thumb.shape == (1024, 766, 3) and np.abs(thumb - ref).mean() < 4
    # 26 Mpx in the file, 1.6 Mpx decoded: a 5-Mpx budget passes (mpp given: a JPEG has none)
    grid = build("tiler", "otsu", max_decode_mpx=5).tile(wsi, (0.2495, 0.2495))
    assert grid.info["thumbnail_decode_px"] == 4440 * 5934 // 16 and len(grid) > 0
    with pytest.raises(PixelBudgetError, match=r"= 26 Mpx \(after shrink-on-load: 2 Mpx\), over the decode budget "
                                               r"of 1 Mpx"):
        build("tiler", "otsu", max_decode_mpx=1).tile(wsi, (0.2495, 0.2495))
