"""Bad input (issue #3 item 5): every file in ../shared/data/bad-slides gets its specific, readable error naming
the file and the cause, directly and through the whole ``embed`` pipeline (manifest, exit code, resume).

Expected behaviour per file is PROVENANCE.md's "observed behaviour" column; the policy for a corrupt tile is
to fail the slide with SlideReadError (docs/slides.md).
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import gigapath_core as gp
from gigapath_core.api import build
from gigapath_core.errors import MissingMppError, SlideOpenError, SlideReadError
from gigapath_core.stages.tiling import open_slide

READERS = ["openslide", "tifffile", "pyvips"]  # the default order (config.PipelineConfig.readers)


def bad(shared_data, name) -> str:
    return str(shared_data / "bad-slides" / name)


def tile(path, mpp=None):
    with open_slide(path, READERS) as wsi:
        return build("tiler", "otsu").tile(wsi, mpp)


def test_not_a_slide(shared_data):
    path = bad(shared_data, "broken-random-ascii.svs")
    with pytest.raises(SlideOpenError) as err:
        open_slide(path, READERS)
    msg = str(err.value)
    assert msg.startswith(f"{path}: no reader could open it")
    assert "openslide: not a slide format OpenSlide recognises" in msg
    assert "tifffile: not a TIFF file" in msg
    assert "pyvips: libvips cannot open it" in msg and "is not a known file format" in msg
    assert "\n" not in msg


def test_unsupported_compression(shared_data):
    path = bad(shared_data, "unopenable-bad-compression.tiff")
    with pytest.raises(SlideOpenError) as err:
        open_slide(path, READERS)
    msg = str(err.value)
    assert "openslide: OpenSlide cannot open it: Unsupported TIFF compression: 52479" in msg
    assert "tifffile: unsupported TIFF compression 52479" in msg


def test_corrupt_tile_fails_the_slide(shared_data):
    """PROVENANCE: opens (aperio, mpp 0.499), then decoding raises "Bogus marker length"."""
    path = bad(shared_data, "unreadable-corrupt-tile.svs")
    with open_slide(path, READERS) as wsi:
        assert wsi.reader == "openslide" and wsi.mpp == pytest.approx((0.499, 0.499))
        with pytest.raises(SlideReadError, match="corrupt image data.*Bogus marker length") as err:
            wsi.read_region((0, 0), 0, (16, 16))
        assert str(err.value).startswith(path)
    with pytest.raises(SlideReadError, match="Bogus marker length"):
        tile(path)
    for reader in ("tifffile", "pyvips"):  # the fallbacks fail on decode too, with the same class
        with build("slide_reader", reader).open(path) as wsi:
            with pytest.raises(SlideReadError, match="Bogus marker length"):
                wsi.read_region((0, 0), 0, (16, 16))


def test_smaller_than_one_tile_is_valid_with_zero_tiles(shared_data):
    grid = tile(bad(shared_data, "tiny-16x16.svs"))
    assert len(grid) == 0 and grid.source_mpp == pytest.approx((0.499, 0.499))


def test_nearly_empty_ihc(shared_data):
    path = bad(shared_data, "kidney-48-5-nearly-empty-ihc.tif")
    with pytest.raises(MissingMppError, match="no microns-per-pixel.*inputs.mpp.*slide_mpp"):
        tile(path)
    # with an override the slide tiles: one small fragment (~0.3% of the image, PROVENANCE) -> few or no tiles
    grid = tile(path, mpp=(0.5, 0.5))
    assert grid.info["tissue_fraction"] < 0.01
    assert (grid.info["grid_cols"], grid.info["grid_rows"]) == (1493 // 256, 901 // 256)
    assert len(grid) <= 2


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(SlideOpenError, match="file not found"):
        open_slide(str(tmp_path / "nope.svs"), READERS)
    with pytest.raises(SlideOpenError, match="not a file"):
        open_slide(str(tmp_path), READERS)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideOpenError, match="empty file"):
        open_slide(str(empty), READERS)


@pytest.fixture(scope="module")
def corrupt_tile_pyramid(tmp_path_factory, example_slide):
    """CMU-1-Small-Region as a JPEG tiled pyramid whose level-0 JPEG tile (4, 6) (px 1024-1280 x 1536-1792, in
    the tissue) has its SOI marker zeroed:
    the thumbnail (coarse levels) reads fine, the tile read during embedding fails."""
    import pyvips
    import tifffile

    src = pyvips.Image.new_from_file(str(example_slide)).copy()
    src.remove("image-description")
    path = tmp_path_factory.mktemp("corrupt") / "corrupt-tile-pyramid.tif"
    src.tiffsave(str(path), tile=True, pyramid=True, compression="jpeg", Q=85, tile_width=256, tile_height=256,
                 xres=1000 / 0.499, yres=1000 / 0.499, resunit="cm")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        n_x = -(-page.imagewidth // page.tilewidth)
        offset = page.dataoffsets[6 * n_x + 4]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\x00\x00\x00")
    return path


def test_corrupt_tile_found_while_embedding(corrupt_tile_pyramid):
    from gigapath_core.stages.tile_embedding import TileDataset

    with open_slide(str(corrupt_tile_pyramid), READERS) as wsi:
        grid = build("tiler", "otsu").tile(wsi)  # the thumbnail comes from a coarse level: fine
        assert wsi.reader == "openslide"
    ds = TileDataset(str(corrupt_tile_pyramid), "openslide", build("tiler", "otsu"), grid.coords, grid.level,
                     grid.read_size, grid.tile_size, transform=lambda t: t)
    bad_tiles = [i for i, (x, y) in enumerate(grid.coords) if x < 1280 and y < 1792 and x + 256 > 1024 and y + 256 > 1536]
    assert bad_tiles
    with pytest.raises(SlideReadError, match="corrupt image data"):
        ds.read(bad_tiles[0])
    assert ds.read(0).shape == (256, 256, 3)  # the other tiles still read


# ------------------------------------------------------------------ through the pipeline
TINY_VIT = {"name": "dinov2_vit", "weights": "random", "num_workers": 0, "batch_size": 64,
            "params": {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
                       "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}

EXPECTED = {  # slide_id -> (status, error_type, words in the reason)
    "CMU-1-Small-Region": ("ok", "", []),
    "OS-1-detail": ("ok", "", []),
    "tiny-16x16": ("ok", "", ["zero tiles"]),
    "broken-random-ascii": ("failed", "SlideOpenError", ["broken-random-ascii.svs", "not a TIFF file"]),
    "unopenable-bad-compression": ("failed", "SlideOpenError", ["unopenable-bad-compression.tiff", "52479"]),
    "unreadable-corrupt-tile": ("failed", "SlideReadError", ["unreadable-corrupt-tile.svs", "Bogus marker length"]),
    "kidney-48-5-nearly-empty-ihc": ("failed", "MissingMppError", ["kidney-48-5-nearly-empty-ihc.tif", "slide_mpp"]),
    "bone-marrow-jpeg": ("failed", "ImplausibleMppError", ["bone-marrow-jpeg.dcm", "16.78"]),
    "corrupt-tile-pyramid": ("failed", "SlideReadError", ["corrupt-tile-pyramid.tif", "cannot read tile"]),
}


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_batch_records_each_failure_and_resumes(shared_data, corrupt_tile_pyramid, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for src in [shared_data / "slides" / "CMU-1-Small-Region.svs", shared_data / "slides" / "OS-1-detail.ome.tif",
                corrupt_tile_pyramid, *sorted((shared_data / "bad-slides").iterdir())]:
        os.symlink(src, folder / src.name)
    dicom = folder / "dicom"
    dicom.mkdir()
    os.symlink(shared_data / "slides" / "dicom-bone-marrow-jpeg" / "bone-marrow-jpeg.dcm", dicom / "bone-marrow-jpeg.dcm")
    cfg = {"inputs": {"slides": [str(folder / "*.*"), str(dicom / "*.dcm")]}, "tile_encoder": TINY_VIT,
           "slide_encoder": {"name": "mean", "params": {"in_dim": 48}}}
    out = tmp_path / "out"
    assert gp.run(cfg, out=str(out)) == 1

    rows = _manifest(out)
    assert set(rows) == set(EXPECTED)
    for sid, (status, etype, words) in EXPECTED.items():
        row = rows[sid]
        assert (row["status"], row["error_type"]) == (status, etype), (sid, row["reason"])
        for w in words:
            assert w in row["reason"], (sid, w, row["reason"])
        assert "Traceback" not in row["reason"] and "\n" not in row["reason"]
    assert rows["OS-1-detail"]["reader"] == "tifffile" and rows["CMU-1-Small-Region"]["reader"] == "openslide"
    assert int(rows["CMU-1-Small-Region"]["n_tiles"]) > 0 and rows["tiny-16x16"]["n_tiles"] == "0"

    # re-run: slides done are skipped (their files untouched), failed ones are tried again
    tiles_h5 = out / "CMU-1-Small-Region" / "tiles.h5"
    mtime = tiles_h5.stat().st_mtime_ns
    assert gp.run(cfg, out=str(out)) == 1
    rows2 = _manifest(out)
    for sid, (status, etype, _) in EXPECTED.items():
        assert rows2[sid]["status"] == status and rows2[sid]["this_run"] == ("skipped" if status == "ok"
                                                                              else "failed"), sid
        assert rows2[sid]["error_type"] == etype
    assert tiles_h5.stat().st_mtime_ns == mtime

    # the missing mpp supplied in a manifest CSV (slide_mpp): that slide now succeeds
    manifest = tmp_path / "kidney.csv"
    manifest.write_text(f"slide_path,slide_mpp\n{folder / 'kidney-48-5-nearly-empty-ihc.tif'},0.5\n")
    assert gp.run({**cfg, "inputs": {"manifest": str(manifest)}}, out=str(out)) == 0
    row = _manifest(out)["kidney-48-5-nearly-empty-ihc"]
    assert row["status"] == "ok" and int(row["n_tiles"]) <= 2
    from gigapath_core.store import read_h5

    _, attrs = read_h5(out / "kidney-48-5-nearly-empty-ihc" / "tiles.h5")
    assert attrs["mpp_source"] == "override" and attrs["source_mpp_x"] == 0.5
    assert np.isfinite(attrs["source_mpp_y"])
    shutil.rmtree(folder)


@pytest.mark.parametrize("cut, hint", [
    (1_000_000, "file truncated? (the TIFF points past its end: offset 1,275,950 > size 1,000,000)"),
    (1_275_960,  # the first IFD starts inside but ends outside (2 + 16 * 12 + 4 B)
     "file truncated? (the TIFF points past its end: IFD at 1,275,950 ends at 1,276,148 > size 1,275,960)"),
    (1_938_955, None),  # the whole file: no hint (and it opens)
])
def test_a_cut_tiff_is_reported_as_truncated(example_slide, tmp_path, cut, hint):
    from gigapath_core.stages.tiling import _tiff_points_past_end

    path = tmp_path / "cut.svs"
    path.write_bytes(example_slide.read_bytes()[:cut])
    assert _tiff_points_past_end(path) == hint
    if hint:
        with pytest.raises(SlideOpenError) as err:
            open_slide(str(path), READERS)
        assert str(err.value).startswith(f"{path}: no reader could open it — {hint}; openslide: ")
