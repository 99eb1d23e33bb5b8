"""Slide readers (issue #3 item 1-2): openslide, tifffile, pyvips, tiatoolbox.

Expected values come from ../shared/data/PROVENANCE.md (dimensions, mpp, byte order, which library opens
which file), from files written here with tifffile/pyvips with known resolution tags, and from independent
decoders (one reader's pixels against another's, tifffile's whole-image decode, PIL's box resize).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from gigapath_core.api import build
from gigapath_core.errors import SlideOpenError
from gigapath_core.stages.tiling import open_slide

CORE_READERS = ["openslide", "tifffile", "pyvips"]


def _tiatoolbox_available() -> bool:
    try:
        import tiatoolbox.wsicore.wsireader  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but tiatoolbox is not installed; .ci/run must install it (see docs/slides.md)")
        return False
    return True


def open_with(reader: str, path):
    return build("slide_reader", reader).open(str(path))


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ------------------------------------------------------------------ real slides: metadata
def test_cmu_metadata_every_reader(shared_data):
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    for reader in CORE_READERS:
        with open_with(reader, path) as wsi:
            assert wsi.reader == reader
            assert wsi.level_dimensions == [(2220, 2967)], reader  # PROVENANCE: 2220x2967, 1 level
            assert wsi.level_downsamples == [1.0]
            assert wsi.mpp == pytest.approx((0.499, 0.499)), reader  # PROVENANCE: mpp 0.499 (Aperio MPP)


@pytest.mark.parametrize("name,size", [("OS-1-detail.ome.tif", 1101), ("OS-2-ndpi.ome.tif", 2202)])
def test_big_endian_ome_tiff(shared_data, name, size):
    """PROVENANCE: big-endian OME-TIFF, OpenSlide cannot open it; mpp 0.2271 from OME PhysicalSizeX/Y."""
    path = shared_data / "slides" / name
    with pytest.raises(SlideOpenError, match="not a slide format OpenSlide recognises"):
        open_with("openslide", path)
    for reader in ("tifffile", "pyvips"):
        with open_with(reader, path) as wsi:
            assert wsi.level_dimensions == [(size, size)]
            assert wsi.mpp[0] == pytest.approx(0.2271, abs=1e-4)
            assert wsi.mpp[1] == pytest.approx(0.2271, abs=1e-4)
    with open_with("tifffile", path) as wsi:
        assert wsi.properties["tifffile.byteorder"] == ">"
    # the default reader order falls back to tifffile
    with open_slide(str(path), ["openslide", "tifffile", "pyvips"]) as wsi:
        assert wsi.reader == "tifffile"


def test_dicom_opens_with_openslide_only(shared_data):
    path = shared_data / "slides" / "dicom-bone-marrow-jpeg" / "bone-marrow-jpeg.dcm"
    with open_with("openslide", path) as wsi:
        assert wsi.level_dimensions == [(957, 715)]
        assert wsi.mpp == pytest.approx((16.783, 16.783), abs=1e-3)  # PixelSpacing 0.016783 mm (PROVENANCE)
    for reader in ("tifffile", "pyvips"):
        with pytest.raises(SlideOpenError):
            open_with(reader, path)


# ------------------------------------------------------------------ real slides: pixels
def test_cmu_pixels_agree_across_readers(shared_data):
    """Three independent decoders (OpenSlide, tifffile+imagecodecs, libvips) give the same pixels."""
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    loc, size = (700, 1300), (300, 200)
    with open_with("openslide", path) as wsi:
        ref = wsi.read_region(loc, 0, size)
    assert ref.shape == (200, 300, 3) and ref.dtype == np.uint8
    assert 60 < ref.mean() < 240  # tissue, not background
    for reader in ("tifffile", "pyvips"):
        with open_with(reader, path) as wsi:
            img = wsi.read_region(loc, 0, size)
        assert img.shape == ref.shape and img.dtype == np.uint8
        assert mean_abs_diff(img, ref) < 1.0, reader


def test_ome_region_matches_whole_image_decode(shared_data):
    """tifffile reader decodes only the overlapped tiles; compare with tifffile's whole-image decode."""
    import tifffile

    path = shared_data / "slides" / "OS-2-ndpi.ome.tif"
    full = tifffile.imread(path)
    assert full.shape == (2202, 2202, 3)
    for loc, size in [((0, 0), (100, 80)), ((500, 1000), (600, 300)), ((1023, 511), (3, 3))]:
        with open_with("tifffile", path) as wsi:
            img = wsi.read_region(loc, 0, size)
        x, y = loc
        np.testing.assert_array_equal(img, full[y:y + size[1], x:x + size[0]])


def test_pyvips_ycbcr_fix_on_bioformats_ome(shared_data):
    """Bio-Formats writes JFIF (YCbCr) JPEG tiles under Photometric RGB; libvips alone returns the YCbCr values
    (mean abs diff ~34 grey levels). Our pyvips reader converts them: it must agree with tifffile."""
    path = shared_data / "slides" / "OS-1-detail.ome.tif"
    with open_with("tifffile", path) as a, open_with("pyvips", path) as b:
        ref, img = a.read_region((100, 50), 0, (400, 300)), b.read_region((100, 50), 0, (400, 300))
    assert mean_abs_diff(img, ref) < 1.5


@pytest.mark.parametrize("reader", CORE_READERS)
def test_out_of_bounds_is_white(example_slide, reader):
    with open_with(reader, example_slide) as wsi:
        w, h = wsi.level_dimensions[0]
        img = wsi.read_region((w - 10, h - 20), 0, (30, 40))
        inside = wsi.read_region((w - 10, h - 20), 0, (10, 20))
        neg = wsi.read_region((-5, -5), 0, (10, 10))
    assert img.shape == (40, 30, 3)
    assert (img[:, 10:] == 255).all() and (img[20:] == 255).all()
    np.testing.assert_array_equal(img[:20, :10], inside)
    assert (neg[:5] == 255).all() and (neg[:, :5] == 255).all()


@pytest.mark.parametrize("reader", CORE_READERS)
def test_thumbnail_matches_box_downsample(shared_data, reader):
    """Thumbnail = area average of the slide: compare with PIL's box resize of tifffile's full decode."""
    import tifffile
    from PIL import Image

    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    full = tifffile.imread(path)
    with open_with(reader, path) as wsi:
        th = wsi.thumbnail(512)
    assert th.shape == (512, 383, 3)  # long side 512; 2220 * 512 / 2967 = 383.1
    ref = np.asarray(Image.fromarray(full).resize((383, 512), Image.Resampling.BOX))
    assert mean_abs_diff(th, ref) < 3.0, reader


def test_thumbnail_never_upsamples(shared_data):
    path = shared_data / "bad-slides" / "tiny-16x16.svs"
    for reader in CORE_READERS:
        with open_with(reader, path) as wsi:
            assert wsi.thumbnail(1024).shape == (16, 16, 3)


def test_blockwise_thumbnail_is_bounded_and_exact():
    """The block-wise thumbnail decodes at most block_px^2 px per read and equals a whole-image box resize."""
    from PIL import Image

    from gigapath_plugins.readers._common import blockwise_thumbnail

    rng = np.random.default_rng(0)
    level = rng.integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    areas = []

    def read(x, y, w, h):
        areas.append(w * h)
        return level[y:y + h, x:x + w]

    th = blockwise_thumbnail(read, (1000, 700), (143, 100), block_px=64)
    assert max(areas) <= (64 + 8) ** 2  # a block plus the partial pixels at its edges
    ref = np.asarray(Image.fromarray(level).resize((143, 100), Image.Resampling.BOX))
    assert np.abs(th.astype(int) - ref.astype(int)).max() <= 1


# ------------------------------------------------------------------ written here: mpp from tags
def _write_tiff(path, resolution=None, resolutionunit=None, metadata=None, ome=False):
    import tifffile

    rng = np.random.default_rng(1)
    data = rng.integers(0, 255, (512, 768, 3), dtype=np.uint8)
    kwargs = {"tile": (256, 256), "photometric": "rgb", "metadata": metadata}
    if resolution is not None:
        kwargs["resolution"] = resolution
    if resolutionunit is not None:
        kwargs["resolutionunit"] = resolutionunit
    tifffile.imwrite(path, data, ome=ome, **kwargs)
    return data


@pytest.mark.parametrize("unit,res,expected", [
    ("CENTIMETER", 40000.0, 0.25),   # 40,000 px/cm = 0.25 µm/px
    ("INCH", 50800.0, 0.5),          # 25,400 µm/inch / 50,800 px/inch
    ("NONE", 40000.0, None),         # no absolute unit: no mpp, never a guess
])
def test_plain_tiff_resolution(tmp_path, unit, res, expected):
    path = tmp_path / "plain.tif"
    data = _write_tiff(path, resolution=(res, res), resolutionunit=unit)
    for reader in CORE_READERS:
        with open_with(reader, path) as wsi:
            if expected is None:
                assert wsi.mpp is None, reader
            else:
                assert wsi.mpp == pytest.approx((expected, expected), rel=1e-6), reader
            np.testing.assert_array_equal(wsi.read_region((300, 200), 0, (50, 40)), data[200:240, 300:350])


def test_ome_physical_size_unit(tmp_path):
    """OME PhysicalSizeX in nm must be converted (227.1 nm = 0.2271 µm)."""
    path = tmp_path / "nm.ome.tif"
    _write_tiff(path, ome=True, metadata={"axes": "YXS", "PhysicalSizeX": 227.1, "PhysicalSizeXUnit": "nm",
                                          "PhysicalSizeY": 0.2272, "PhysicalSizeYUnit": "µm"})
    for reader in ("tifffile", "pyvips"):
        with open_with(reader, path) as wsi:
            assert wsi.mpp == pytest.approx((0.2271, 0.2272), rel=1e-6), reader


def test_units_helpers():
    from gigapath_core.units import length_to_um, tiff_resolution_to_mpp

    assert length_to_um(227.1, "nm") == pytest.approx(0.2271)
    assert length_to_um(0.5, None) == 0.5
    assert tiff_resolution_to_mpp(20000, 3) == pytest.approx(0.5)
    assert tiff_resolution_to_mpp(50800, "inch") == pytest.approx(0.5)
    assert tiff_resolution_to_mpp(1, 3) is None  # libvips/writers' "unknown" placeholder
    with pytest.raises(ValueError):
        length_to_um(1.0, "reference frame")


# ------------------------------------------------------------------ pyramids written by libvips
@pytest.fixture(scope="module")
def pyramids(tmp_path_factory, example_slide):
    """CMU-1-Small-Region as a JPEG tiled pyramid (page pyramid and SubIFD pyramid) at 0.499 µm/px."""
    import pyvips

    src = pyvips.Image.new_from_file(str(example_slide)).copy()
    src.remove("image-description")  # not an Aperio file any more
    out = tmp_path_factory.mktemp("pyr")
    paths = {}
    for kind, extra in (("pages", {}), ("subifd", {"subifd": True})):
        p = out / f"{kind}.tif"
        src.tiffsave(str(p), tile=True, pyramid=True, compression="jpeg", Q=90, tile_width=256, tile_height=256,
                     xres=1000 / 0.499, yres=1000 / 0.499, resunit="cm", **extra)
        paths[kind] = p
    return paths


@pytest.mark.parametrize("kind,readers", [("pages", CORE_READERS), ("subifd", ["tifffile", "pyvips"])])
def test_pyramid_levels(pyramids, kind, readers):
    """Level sizes are floor(w / 2^k) as libvips writes them; a level-1 read equals level 0 box-downsampled."""
    from PIL import Image

    expected = [(2220 >> k, 2967 >> k) for k in range(5)]
    for reader in readers:
        with open_with(reader, pyramids[kind]) as wsi:
            assert wsi.level_dimensions[:5] == expected, reader
            assert wsi.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
            assert wsi.mpp == pytest.approx((0.499, 0.499), rel=1e-4), reader
            l0 = wsi.read_region((800, 1200), 0, (400, 300))
            l1 = wsi.read_region((800, 1200), 1, (200, 150))
        ref = np.asarray(Image.fromarray(l0).resize((200, 150), Image.Resampling.BOX))
        assert mean_abs_diff(l1, ref) < 4.0, reader


# ------------------------------------------------------------------ tiatoolbox (optional extra)
def test_tiatoolbox_reader(shared_data):
    if not _tiatoolbox_available():
        pytest.skip("tiatoolbox not installed (optional extra; CI installs it, see docs/slides.md)")
    cmu = shared_data / "slides" / "CMU-1-Small-Region.svs"
    ome = shared_data / "slides" / "OS-2-ndpi.ome.tif"
    with open_with("tiatoolbox", cmu) as wsi, open_with("openslide", cmu) as ref:
        assert wsi.level_dimensions == [(2220, 2967)]
        assert wsi.mpp == pytest.approx((0.499, 0.499))
        assert mean_abs_diff(wsi.read_region((700, 1300), 0, (300, 200)), ref.read_region((700, 1300), 0, (300, 200))) < 1
        assert (wsi.read_region((2210, 0), 0, (20, 5))[:, 10:] == 255).all()
    with open_with("tiatoolbox", ome) as wsi, open_with("tifffile", ome) as ref:
        assert wsi.mpp[0] == pytest.approx(0.2271, abs=1e-4)
        np.testing.assert_array_equal(wsi.read_region((500, 700), 0, (64, 32)), ref.read_region((500, 700), 0, (64, 32)))
    with open_with("tiatoolbox", shared_data / "bad-slides" / "kidney-48-5-nearly-empty-ihc.tif") as wsi:
        assert wsi.mpp is None  # no resolution in the file: nothing invented
    with pytest.raises(SlideOpenError, match="tiatoolbox cannot open it"):
        open_with("tiatoolbox", shared_data / "bad-slides" / "broken-random-ascii.svs")
