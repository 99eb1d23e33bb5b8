"""The Otsu tiler's fast paths (issue #16 item 3) give the old results pixel for pixel, and the tiling stage's
QC outputs are written off the critical path without losing the per-slide failure boundary.

References: each fast function is compared with the library call it replaced (skimage ``rank.median``,
scipy ``binary_fill_holes`` and ``ndimage.label``, a float64 cumsum) on random inputs built to hit image
borders, even-sized windows, holes touching the border and pooled specks; the kept tiles of the bundled
CMU-1-Small-Region are pinned to the values the tiler gave before the change (49 tiles).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest

import gigapath_core as gp
from gigapath_core.api import build
from gigapath_core.config import SlideInput, load_pipeline_config
from gigapath_core.pipeline import process_slide
from gigapath_core.stages import tiling
from gigapath_core.stages.tiling import open_slide
from gigapath_plugins.tilers.otsu import fill_mask_holes, median_blur, occupancy_grid, remove_specks

from faults_helpers import copy_slide, manifest, tiler_only


@pytest.mark.parametrize("size", [3, 5, 7, 9, 6])
@pytest.mark.parametrize("shape", [(1, 40), (13, 13), (29, 57), (120, 90)])
def test_median_blur_is_skimage_rank_median(size, shape):
    from skimage.filters import rank

    rng = np.random.default_rng(size * 1000 + shape[0])
    img = rng.integers(0, 256, shape).astype(np.uint8)
    img[: shape[0] // 2] //= 8  # a low band: ties, as in a slide's background
    got = median_blur(img, size)
    want = rank.median(img, footprint=np.ones((size, size), bool))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def _ref_specks(mask, min_area_px, pool):
    """remove_specks as it was written before issue #16: scipy labels on the max-pooled mask, float weights."""
    from scipy import ndimage

    h, w = mask.shape
    H, W = -(-h // pool), -(-w // pool)
    padded = np.zeros((H * pool, W * pool), bool)
    padded[:h, :w] = mask
    pooled = padded.reshape(H, pool, W, pool).any(axis=(1, 3))
    labels, n = ndimage.label(pooled, structure=np.ones((3, 3), bool))
    if n == 0:
        return mask
    counts = padded.reshape(H, pool, W, pool).sum(axis=(1, 3))
    area = np.bincount(labels.ravel(), weights=counts.ravel(), minlength=n + 1)
    keep = area >= min_area_px
    keep[0] = False
    kept = np.repeat(np.repeat(keep[labels], pool, 0), pool, 1)
    return mask & kept[:h, :w]


@pytest.mark.parametrize("seed", range(6))
def test_fill_holes_specks_and_integral_match_the_libraries(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(1, 160, 2))
    mask = rng.random(shape) < rng.uniform(0.3, 0.7)
    np.testing.assert_array_equal(fill_mask_holes(mask), ndimage.binary_fill_holes(mask))
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False  # an enclosed hole
    ring[0:4, 4] = False  # ...opened to the top border by a 1-px channel: not a hole any more
    np.testing.assert_array_equal(fill_mask_holes(ring), ndimage.binary_fill_holes(ring))
    assert not fill_mask_holes(ring)[4, 4]
    for pool in (1, 2, 3, 5):
        for area in (1.5, 6.0, 40.0):
            np.testing.assert_array_equal(remove_specks(mask, area, pool), _ref_specks(mask, area, pool))
    side = (rng.uniform(1.5, 20), rng.uniform(1.5, 20))
    n_cols, n_rows = int(shape[1] // side[0]) + 1, int(shape[0] // side[1]) + 1
    fast = occupancy_grid(mask, n_cols, n_rows, side)
    slow = occupancy_grid(mask.astype(np.float64), n_cols, n_rows, side)  # the float cumsum path
    np.testing.assert_array_equal(fast, slow)


def test_cmu_kept_tiles_are_pinned(example_slide):
    """The kept tiles, occupancy and mask on CMU-1-Small-Region are those of the tiler before issue #16
    (rank.median, binary_fill_holes, ndimage.label, float cumsum): same 49 tiles, same mask bit for bit."""
    with open_slide(str(example_slide), ["openslide"]) as wsi:
        grid = build("tiler", "otsu").tile(wsi)
    index = (grid.grid_coords // 256).tolist()
    assert index == [[3, 0], [4, 0], [3, 1], [4, 1], [5, 1], [3, 2], [4, 2], [5, 2], [6, 2], [3, 3], [4, 3],
                     [5, 3], [6, 3], [1, 4], [2, 4], [3, 4], [4, 4], [5, 4], [6, 4], [3, 5], [4, 5], [5, 5],
                     [6, 5], [7, 5], [3, 6], [4, 6], [5, 6], [6, 6], [3, 7], [4, 7], [5, 7], [6, 7], [2, 8],
                     [3, 8], [4, 8], [5, 8], [6, 8], [7, 8], [2, 9], [3, 9], [4, 9], [5, 9], [6, 9], [7, 9],
                     [2, 10], [3, 10], [4, 10], [5, 10], [6, 10]]
    assert grid.coords[:3].tolist() == [[770, 0], [1026, 0], [770, 257]] and grid.coords[-1].tolist() == [1539, 2565]
    np.testing.assert_allclose(grid.occupancy[:8], [0.2317, 0.3229, 0.3760, 0.9999, 0.4872, 0.2114, 1.0, 0.9809],
                               atol=5e-5)
    assert float(grid.occupancy.astype(np.float64).sum()) == pytest.approx(32.399063751101494, abs=1e-9)
    assert grid.info["otsu_threshold"] == 52.0 and grid.tissue_mask.shape == (1024, 766)
    assert int(grid.tissue_mask.sum()) == 275315
    assert hashlib.sha256(np.packbits(grid.tissue_mask).tobytes()).hexdigest()[:16] == "0b0930dc1be61bc3"


def test_qc_outputs_are_written_after_tiles_h5_and_joined(tmp_path, example_slide, monkeypatch):
    """start_tiling returns once tiles.h5 is written while the QC thread is still drawing; wait() joins it."""
    release, drawing = threading.Event(), threading.Event()
    real = tiling.qc_thumbnail

    def slow_qc(*args, **kwargs):
        drawing.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiling, "qc_thumbnail", slow_qc)
    with open_slide(str(example_slide), ["openslide"]) as wsi:
        grid, pending = tiling.start_tiling(build("tiler", "otsu"), wsi, tmp_path, None, {"slide_id": "x"})
    assert drawing.wait(30)
    assert (tmp_path / "tiles.h5").is_file() and not (tmp_path / "thumbnail.png").exists()
    assert not tiling.qc_outputs_present(tmp_path)
    release.set()
    pending.wait()
    assert tiling.qc_outputs_present(tmp_path) and len(grid) == 49
    assert (tmp_path / "tissue.geojson").stat().st_size > 100


def test_a_failing_qc_write_fails_that_slide_as_before_and_the_next_run_redoes_it(tmp_path, monkeypatch):
    """A QC write error in the background thread: the slide fails with the error (as when QC was written
    before tiles.h5), no tiles.h5 or marker vouches for it, and the next run tiles it again."""
    slide = copy_slide(tmp_path / "in" / "a.svs")
    out = tmp_path / "out"
    real = tiling.write_png

    def broken(path, *args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(tiling, "write_png", broken)
    assert gp.run(tiler_only(slide), out=str(out)) == 1
    row = manifest(out)["a"]
    assert (row["status"], row["error_type"]) == ("failed", "OSError"), row
    assert row["reason"] == f"{slide}: unexpected OSError: [Errno 28] No space left on device (injected)"
    assert not (out / "a" / "tiles.h5").exists() and not (out / "a" / "thumbnail.png").exists()
    monkeypatch.setattr(tiling, "write_png", real)
    assert gp.run(tiler_only(slide), out=str(out)) == 0
    assert manifest(out)["a"]["this_run"] == "processed"
    assert tiling.qc_outputs_present(out / "a") and (out / "a" / "tiles.h5").is_file()


def test_tiles_h5_without_its_qc_outputs_is_tiled_again(tmp_path):
    """A run killed after tiles.h5 but before the QC thread finished: the next run redoes the tiling."""
    slide = copy_slide(tmp_path / "in" / "a.svs")
    out = tmp_path / "out"
    assert gp.run(tiler_only(slide), out=str(out)) == 0
    (out / "a" / "status.json").unlink()  # as if killed before the marker...
    (out / "a" / "thumbnail.png").unlink()  # ...and before the QC thread wrote the thumbnail
    before = (out / "a" / "tiles.h5").stat().st_mtime_ns
    cfg, _ = load_pipeline_config(tiler_only(slide), tmp_path, str(out))
    row = process_slide(cfg, SlideInput(slide_id="a", path=str(slide)))
    assert row["status"] == "ok" and (out / "a" / "thumbnail.png").is_file()
    assert (out / "a" / "tiles.h5").stat().st_mtime_ns != before  # tiled again, not reused
