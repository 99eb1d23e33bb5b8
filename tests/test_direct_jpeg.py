"""The openslide reader's direct JPEG path (issue #16 item 2): pixel-identical to OpenSlide's own read_region.

Every comparison is against the ``openslide-library`` reader (every pixel through ``read_region``), and each
test also asserts that the direct path actually served the reads (so that an identity cannot come from a
silent fallback).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gigapath_core.api import build
from gigapath_core.stages.tiling import open_slide


def both(path):
    return build("slide_reader", "openslide").open(str(path)), build("slide_reader", "openslide-library").open(str(path))


def served(wsi, level: int) -> bool:
    d = wsi._direct
    return bool(d) and d.levels[level] is not None and d.levels[level].verified is True


def identical_reads(a, b, boxes, level=0) -> int:
    """Asserts every (x, y, w, h) box (level-0 px location, level px size) reads the same; returns the count."""
    for x, y, w, h in boxes:
        pa, pb = a.read_region((x, y), level, (w, h)), b.read_region((x, y), level, (w, h))
        assert pa.dtype == np.uint8 and pa.shape == (h, w, 3)
        assert np.array_equal(pa, pb), (x, y, w, h, level)
    return len(boxes)


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, example_slide):
    """A 2048 x 2560 crop of CMU-1-Small-Region (levels at exact downsamples 1, 2, 4...) written by libvips as a
    YCbCr JPEG, an RGB-coded JPEG (512-px tiles) and an LZW tiled pyramid."""
    import pyvips

    src = pyvips.Image.new_from_file(str(example_slide)).copy()
    src.remove("image-description")
    src = src.crop(0, 0, 2048, 2560)
    out = tmp_path_factory.mktemp("direct")
    opts = {"tile": True, "pyramid": True, "xres": 1000 / 0.499, "yres": 1000 / 0.499, "resunit": "cm"}
    paths = {"ycbcr": out / "ycbcr.tif", "rgb": out / "rgb.tif", "lzw": out / "lzw.tif"}
    src.tiffsave(str(paths["ycbcr"]), compression="jpeg", Q=85, tile_width=256, tile_height=256, **opts)
    src.tiffsave(str(paths["rgb"]), compression="jpeg", Q=90, rgbjpeg=True, tile_width=512, tile_height=512, **opts)
    src.tiffsave(str(paths["lzw"]), compression="lzw", tile_width=256, tile_height=256, **opts)
    return paths


def test_svs_every_tile_identical(example_slide):
    """CMU-1-Small-Region (Aperio, RGB-coded JPEG with JPEGTables, 240-px tiles): every 256-px tile of the Otsu
    grid, both edge-tile policies, plus boxes across the slide's edges and a whole-JPEG-tile-aligned box."""
    a, b = both(example_slide)
    grid = build("tiler", "otsu", edge_tiles="pad").tile(a)
    assert grid.level == 0 and grid.read_size == 256 and len(grid) > 50
    boxes = [(int(x), int(y), 256, 256) for x, y in grid.coords]
    w0, h0 = a.level_dimensions[0]
    boxes += [(-100, -50, 256, 256), (w0 - 100, h0 - 30, 256, 256), (w0 + 5, 0, 64, 64), (240, 480, 240, 240),
              (1000, 1000, 1, 1), (7, 3, 700, 500)]
    assert identical_reads(a, b, boxes) == len(grid) + 6
    assert served(a, 0) and a._direct.levels[0].tile_w == 240 and a._direct.levels[0].tables
    outside = a.read_region((w0 - 100, 0), 0, (256, 16))
    assert (outside[:, 100:] == 255).all() and not (outside[:, :100] == 255).all()  # white past the edge


@pytest.mark.parametrize("kind", ["ycbcr", "rgb"])
def test_pyramid_levels_identical(pyramids, kind):
    """Each level with an integer downsample is served directly and reads as OpenSlide reads it, at level px
    offsets that are not tile-aligned; a location that is not a whole level px goes to OpenSlide."""
    a, b = both(pyramids[kind])
    rng = np.random.default_rng(0)
    for level in range(3):
        ds = round(a.level_downsamples[level])
        lw, lh = a.level_dimensions[level]
        boxes = [(int(x) * ds, int(y) * ds, 256, 256) for x, y in zip(rng.integers(-64, lw, 12), rng.integers(-64, lh, 12))]
        identical_reads(a, b, boxes, level)
        assert served(a, level), (kind, level)
    identical_reads(a, b, [(301, 205, 128, 128)], level=1)  # odd level-0 px at ds 2: through read_region


def test_not_jpeg_falls_back(pyramids):
    a, b = both(pyramids["lzw"])
    identical_reads(a, b, [(100, 200, 256, 256)])
    assert a._direct is False


def test_mismatch_disables_the_level(example_slide, monkeypatch):
    """A level whose direct decode differs from OpenSlide's (checked on its first read) is read by OpenSlide."""
    a, b = both(example_slide)
    a._direct_tiles()._reference = lambda level, x, y, w, h: np.zeros((h, w, 3), np.uint8)
    identical_reads(a, b, [(500, 600, 256, 256)])
    assert a._direct.levels[0].verified is False and not a._direct._cache


def test_cache_is_bounded_and_reused(example_slide):
    a, _ = both(example_slide)
    d = a._direct_tiles()
    d.cache_bytes = 4 * 240 * 240 * 3
    for x in range(0, 2000, 128):
        a.read_region((x, 1000), 0, (256, 256))
    assert d._cached <= d.cache_bytes and len(d._cache) == 4
    before = dict(d._cache)
    a.read_region((1930, 1000), 0, (8, 8))  # inside a cached JPEG tile (8, 4): no new decode
    assert d._cache.keys() == before.keys() and all(d._cache[k] is before[k] for k in before)


def test_threads_read_the_same_pixels(example_slide):
    a, b = both(example_slide)
    boxes = [(x, y, 256, 256) for y in range(0, 2600, 300) for x in range(0, 1900, 300)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda box: a.read_region(box[:2], 0, box[2:]), boxes))
    for box, pixels in zip(boxes, got):
        assert np.array_equal(pixels, b.read_region(box[:2], 0, box[2:])), box
    assert served(a, 0)


def _child_read(wsi, queue):
    queue.put(wsi.read_region((700, 900), 0, (256, 256)).tobytes())


def test_forked_child_reads_with_the_inherited_handle(example_slide):
    """A DataLoader worker started by fork inherits an open WSI: it gets its own lock and cache and reads the
    same pixels (pread: no shared file offset)."""
    a, b = both(example_slide)
    a.read_region((0, 0), 0, (256, 256))  # the parent has a cache and verified level
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(a, queue))
    proc.start()
    pixels = queue.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    assert pixels == b.read_region((700, 900), 0, (256, 256)).tobytes()
    assert a.read_region((700, 900), 0, (256, 256)).tobytes() == pixels


def test_reader_names_are_recorded(example_slide):
    with open_slide(str(example_slide), ["openslide-library", "tifffile"]) as wsi:
        assert wsi.reader == "openslide-library" and wsi._direct is False
    with open_slide(str(example_slide), ["openslide", "tifffile"]) as wsi:
        assert wsi.reader == "openslide"
        wsi.read_region((0, 0), 0, (16, 16))
        assert served(wsi, 0)
    assert wsi._direct._fd == -1  # closed with the slide


def test_tifffile_reader_caches_jpeg_tiles(shared_data):
    """The tifffile reader serves JPEG-tiled levels from the same cache: the same pixels as its uncached
    segment decode, on the big-endian Bio-Formats OME-TIFF (512-px tiles, JFIF JPEG tagged RGB)."""
    path = shared_data / "slides" / "OS-2-ndpi.ome.tif"
    a, b = build("slide_reader", "tifffile").open(str(path)), build("slide_reader", "tifffile").open(str(path))
    b._direct = False
    boxes = [(x, y, 565, 565) for y in range(-300, 2202, 400) for x in range(-300, 2202, 400)]
    identical_reads(a, b, boxes)
    assert served(a, 0) and a._direct.levels[0].tile_w == 512 and len(a._direct._cache) == 25
