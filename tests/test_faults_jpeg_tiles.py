"""Hostile JPEG-tiled TIFFs against the readers' direct JPEG path (``readers/_jpeg_tiles.py``) and their library
fallbacks: each file is crafted in a few milliseconds (tifffile writes our own JPEG bytes as the tiles, then a
tag or a tile is patched). The promise is that of the fault suite: a bad tile fails that slide with
SlideReadError naming the file and the reason, never wrong pixels, a hang, an abort or an unbounded allocation.

A 3 x 3-tile layout puts the hostile tile at index 8, away from the central tile (4) that the direct path
compares with OpenSlide on a level's first read, so it is the per-tile checks that are tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gigapath_core.api import build
from gigapath_core.errors import SlideReadError

from faults_helpers import ROOT, manifest

T = 256


def rgb(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    return np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)


def jpeg(arr: np.ndarray, **kw) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(arr), level=90, **kw))


def with_frame(data: bytes, w: int, h: int) -> bytes:
    """``data`` with its SOF0 frame header claiming ``w`` x ``h`` px."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 9:]


def tiled(path: Path, tiles: list[bytes], side: int, tile: int = T) -> Path:
    """A single-level YCbCr JPEG-tiled TIFF (OpenSlide: generic-tiff) of ``side`` px whose tiles are ``tiles``
    as given; 0.5 µm/px."""
    import tifffile

    tifffile.imwrite(path, iter(tiles), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="jpeg", photometric="ycbcr", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")
    return path


def nine(path: Path, bad: bytes) -> Path:
    good = jpeg(rgb(T, T))
    return tiled(path, [good] * 8 + [bad], 3 * T)


def patch_tags(path: Path, **values: int) -> Path:
    """Overwrite the first value of each named tag of the first page (e.g. TileWidth=65488)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        spots = []
        for name, value in values.items():
            tag = tif.pages[0].tags[name]
            size = tag.valuebytecount // tag.count
            where = tag.valueoffset if tag.valuebytecount > 4 else tag.offset + 8
            spots.append((where, value.to_bytes(size, "little")))
    with open(path, "r+b") as f:
        for where, raw in spots:
            f.seek(where)
            f.write(raw)
    return path


def read(reader: str, path: Path, box=(2 * T, 2 * T)):
    """Opens with ``reader``, reads a first clean tile (the direct path checks its level against OpenSlide),
    then the 256-px box at ``box``: pixels, or the SlideReadError."""
    with build("slide_reader", reader).open(str(path)) as wsi:
        wsi.read_region((0, 0), 0, (16, 16))
        try:
            return wsi.read_region(box, 0, (T, T))
        except SlideReadError as err:
            return err


def grey_tile() -> bytes:
    return jpeg(rgb(T, T)[..., 0])


def cmyk_tile() -> bytes:
    return jpeg(np.concatenate([rgb(T, T), rgb(T, T)[..., :1]], -1), colorspace="CMYK", outcolorspace="CMYK")


GOOD = jpeg(rgb(T, T))
#: case -> (hostile tile 8, OpenSlide's reason, the tifffile reader's reason or None = it decodes the tile;
#: "JPEG tile 8: " is our check before decoding, the rest tifffile's own error)
CASES = {
    "frame 20000 x 20000 px": (with_frame(GOOD, 20000, 20000),
                               "Dimensional mismatch reading JPEG, expected 256x256, got 20000x20000",
                               "JPEG tile 8: its JPEG header says 20000 x 20000 px, the TIFF tile is 256 x 256 px"),
    "frame 128 x 128 px": (jpeg(rgb(128, 128)), "Dimensional mismatch reading JPEG",
                           "JPEG tile 8: its JPEG header says 128 x 128 px"),
    "truncated": (GOOD[:len(GOOD) // 2], "Premature end of JPEG file",
                  "JPEG tile 8: truncated JPEG data (no end-of-image marker)"),
    "no end-of-image marker": (GOOD[:-2], "Premature end of JPEG file", "JPEG tile 8: truncated JPEG data"),
    "not JPEG": (b"\xff\xd8" + bytes(range(256)) * 4, "Premature end of JPEG file",
                 "JPEG tile 8: not a JPEG stream with a frame header"),
    "grey": (None, "Bogus JPEG colorspace", None),
    "CMYK": (None, "Bogus JPEG colorspace", "TiffFileError: corrupted tile"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_jpeg_tile_fails_the_slide_and_is_not_decoded(tmp_path, case):
    """Before: the 20,000-px frame was decoded whole (1.2 GB, 5 s) before the shape check; a truncated tile, a
    grey one and one without EOI came back as pixels (grey fill) where OpenSlide fails. Now the tile's header
    and ending are checked before decoding: the openslide reader falls back to OpenSlide (its error, as
    ``openslide-library``), the tifffile reader names the problem; the good tiles still read directly."""
    bad, openslide_reason, tifffile_reason = CASES[case]
    bad = {"grey": grey_tile, "CMYK": cmyk_tile}.get(case, lambda: bad)()
    path = nine(tmp_path / "hostile.tif", bad)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        got = {reader: read(reader, path) for reader in ("openslide", "openslide-library", "tifffile")}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 10 and peak < 64 * 2**20, (time.monotonic() - t0, peak)
    for reader in ("openslide", "openslide-library"):
        assert isinstance(got[reader], SlideReadError), (reader, got[reader])
        assert str(got[reader]).startswith(f"{path}: cannot decode the region at level-0 (512, 512), level 0 "
                                           "(corrupt image data): " + openslide_reason), str(got[reader])
    if tifffile_reason is None:  # tifffile's own choice: the grey tile converted to RGB
        assert isinstance(got["tifffile"], np.ndarray) and got["tifffile"].shape == (T, T, 3)
        assert np.array_equal(got["tifffile"][..., 0], got["tifffile"][..., 2])
    else:
        assert isinstance(got["tifffile"], SlideReadError)
        assert str(got["tifffile"]).startswith(f"{path}: cannot decode level 0 box (512, 512, 256x256): "
                                               f"{tifffile_reason}"), str(got["tifffile"])
    with build("slide_reader", "openslide").open(str(path)) as wsi:  # the clean tiles: direct and identical
        pixels = wsi.read_region((0, T), 0, (2 * T, T))
        assert wsi._direct.levels[0].verified is True and (0, 8) not in wsi._direct._cache
        assert (0, 3) in wsi._direct._cache and (0, 4) in wsi._direct._cache
        assert np.array_equal(pixels[:, :T], read("openslide-library", path, (0, T)))
        assert np.array_equal(pixels[:, T:], read("openslide-library", path, (T, T)))


def test_byte_counts_past_the_file_or_huge_are_never_allocated(tmp_path, monkeypatch):
    """A TileByteCounts of 4 GiB: before, the direct path asked ``os.pread`` for 4 GiB (a 4 GiB buffer); now a
    count beyond the file or far beyond any JPEG of the tile's size is refused unread and OpenSlide reports
    the tile ("Cannot read raw tile"). A count of 0 (a sparse tile) reads white as OpenSlide draws it."""
    import gigapath_plugins.readers._jpeg_tiles as jt

    asked = []
    real = os.pread
    monkeypatch.setattr(jt.os, "pread", lambda fd, n, off: asked.append(n) or real(fd, n, off))
    import tifffile

    base = nine(tmp_path / "base.tif", GOOD)
    with tifffile.TiffFile(base) as tif:
        tag = tif.pages[0].tags["TileByteCounts"]
        size = tag.valuebytecount // tag.count
        at = tag.valueoffset + 8 * size
    for name, count in (("huge", 2**32 - 1), ("sparse", 0)):
        path = shutil.copy(base, tmp_path / f"{name}.tif")
        with open(path, "r+b") as f:
            f.seek(at)
            f.write(count.to_bytes(size, "little"))
        asked.clear()
        got, lib = read("openslide", path), read("openslide-library", path)
        assert max(asked) < 100_000
        if name == "huge":
            assert isinstance(got, SlideReadError) and "Cannot read raw tile" in str(got)
            assert str(got) == str(lib)
        else:
            assert np.array_equal(got, lib) and (got == 255).all()


def test_tiles_over_the_limit_fail_before_any_decode(tmp_path):
    """A 768-px slide whose TIFF tags say 65,488 x 65,488 px tiles and whose JPEG frame says so too (a valid
    JPEG size: libjpeg fills the missing data). Before: the direct path and tifffile decoded 12 GiB, OpenSlide
    allocated 17 GB for the tile (with a 65,520-px tile under a 6 GiB address-space limit, GLib aborted the
    process: "failed to allocate 17171481600 bytes"; without a limit the decode fills it). Not run against the
    old code here, for the machine's sake. Now every reader fails the slide at once, for a read or a
    thumbnail."""
    from gigapath_plugins.readers._jpeg_tiles import MAX_TILE_PX

    path = tiled(tmp_path / "bigtile.tif", [with_frame(jpeg(rgb(768, 768)), 65488, 65488)], 768, tile=768)
    patch_tags(path, TileWidth=65488, TileLength=65488)
    assert 65488**2 > MAX_TILE_PX >= 16384**2
    for reader, what in (("openslide", "tiles"), ("openslide-library", "tiles"), ("tifffile", "segments")):
        with build("slide_reader", reader).open(str(path)) as wsi:
            for call in (lambda: wsi.read_region((0, 0), 0, (16, 16)), lambda: wsi.thumbnail(64)):
                with pytest.raises(SlideReadError) as err:
                    call()
                assert str(err.value) == (f"{path}: cannot read level 0: its {what} are 65,488 x 65,488 px, over "
                                          "the 268 Mpx a reader decodes at once (a tile is decoded whole: a "
                                          "crafted or broken file)")


def test_threads_reading_a_slide_with_failing_tiles(tmp_path):
    """8 threads over a 2,048-px slide where every 7th tile (from the 4th) is truncated. Before: the direct path
    returned grey-filled pixels for the truncated tiles, and a failing OpenSlide read closed the handle other threads
    were reading (OpenSlide aborted the process: "_openslide_tiffcache_destroy: assertion failed", or every
    later read raised ctypes.ArgumentError "Passing closed slide object"). Now each box over a bad tile raises
    SlideReadError and every other box reads what one thread reads."""
    bad = {i for i in range(64) if i % 7 == 3}  # not 0 (read first) nor 36 (the level's check tile)
    path = tiled(tmp_path / "threads.tif", [GOOD[:len(GOOD) // 2] if i in bad else GOOD for i in range(64)],
                 2048)
    boxes = [(x, y) for y in range(0, 1920, 128) for x in range(0, 1920, 128)] * 2

    def over_bad(x, y):
        return any(ty * 8 + tx in bad for ty in range(y // T, (y + T - 1) // T + 1)
                   for tx in range(x // T, (x + T - 1) // T + 1))

    clean = read("openslide-library", path, (0, 256))
    assert isinstance(clean, np.ndarray) and not over_bad(0, 256)
    for reader in ("openslide", "openslide-library"):
        with build("slide_reader", reader).open(str(path)) as wsi:
            def one(box):
                try:
                    return wsi.read_region(box, 0, (T, T))
                except SlideReadError as err:
                    return err

            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(one, boxes))
            assert wsi._users == {}  # every replaced handle closed
            for box, out in zip(boxes, got):
                if over_bad(*box):
                    assert isinstance(out, SlideReadError) and "Premature end of JPEG file" in str(out), box
                elif reader == "openslide":  # exact; the library may report a good box that shared a handle
                    assert isinstance(out, np.ndarray), (box, out)  # with failing reads (OpenSlide's sticky
                    if box == (0, 256):  # error state), even after two retries on fresh handles
                        assert np.array_equal(out, clean)
            n_ok = sum(isinstance(o, np.ndarray) for o in got)
            assert n_ok >= (0.75 if reader == "openslide-library" else 1.0) * sum(not over_bad(*b) for b in boxes)


def test_slide_replaced_or_truncated_while_open_fails_with_the_reason(tmp_path, example_slide):
    """OpenSlide opens the path again for some reads, and the direct path reads its own descriptor: before, a
    slide replaced at its path while open read OpenSlide's regions from the new file (white here) and the
    direct path's from the old one. Now every OpenSlide read fails it, naming what changed; the direct path
    keeps reading the file it opened."""
    for reader in ("openslide", "openslide-library"):
        path = shutil.copy(example_slide, tmp_path / "s.svs")
        with build("slide_reader", reader).open(str(path)) as wsi:
            before = wsi.read_region((1500, 2000), 0, (T, T))
            os.replace(nine(tmp_path / "other.tif", GOOD), path)
            if reader == "openslide":
                assert np.array_equal(wsi.read_region((1500, 2000), 0, (T, T)), before)
            calls = [lambda: wsi.thumbnail(256)]
            if reader == "openslide-library":
                calls.append(lambda: wsi.read_region((1500, 2000), 0, (T, T)))
            for call in calls:
                with pytest.raises(SlideReadError) as err:
                    call()
                assert str(err.value) == (f"{path}: the file changed on disk while it was open: another file was "
                                          "put at its path")
        path = shutil.copy(example_slide, tmp_path / "t.svs")
        with build("slide_reader", reader).open(str(path)) as wsi:
            wsi.read_region((0, 0), 0, (T, T))
            os.truncate(path, 969_477)
            for call in (lambda: wsi.thumbnail(256), lambda: wsi.read_region((1900, 2700), 0, (T, T))):
                with pytest.raises(SlideReadError) as err:
                    call()
                assert str(err.value) == (f"{path}: the file changed on disk while it was open: its size changed "
                                          "(1,938,955 -> 969,477 bytes)")


def test_run_with_a_hostile_slide_finishes_the_good_one(tmp_path, example_slide):
    """``gigapath run`` over the bundled slide and the 65,488-px-tile slide (see above: before, a decode of
    17 GB in the run's process); now the hostile slide is a failed row with its reason, the other one is done."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(example_slide, slides / "good.svs")
    bad = tiled(slides / "bigtile.tif", [with_frame(jpeg(rgb(768, 768)), 65488, 65488)], 768, tile=768)
    patch_tags(bad, TileWidth=65488, TileLength=65488)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"inputs": {"slides": [str(slides / "good.svs"), str(bad)]}, "readers": ["openslide"],
                               "device": "cpu"}))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "gigapath_core.cli", "run", str(cfg), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "GIGAPATH_PROGRESS": "0"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    rows = manifest(out)
    assert rows["good"]["status"] == "ok" and int(rows["good"]["n_tiles"]) > 0
    row = rows["bigtile"]
    assert (row["status"], row["error_type"]) == ("failed", "SlideReadError")
    assert row["reason"] == (f"{bad}: cannot read level 0: its tiles are 65,488 x 65,488 px, over the 268 Mpx a "
                             "reader decodes at once (a tile is decoded whole: a crafted or broken file)")


@pytest.mark.parametrize("tables", ["zero quantisation table", "random bytes", "no tables"])
def test_corrupt_jpeg_tables_read_as_openslide_reads_them(tmp_path, example_slide, tables):
    """A copy of the bundled SVS whose JPEGTables (shared DQT/DHT of its abbreviated tiles) are damaged in place:
    the direct path gives OpenSlide's pixels (a zeroed table decodes to the same wrong colours in both, which no
    reader can tell from a real slide) or OpenSlide's error."""
    import tifffile

    with tifffile.TiffFile(example_slide) as tif:
        tag = tif.pages[0].tags["JPEGTables"]
        at, old = tag.valueoffset, bytes(tag.value)
    dqt = old.index(b"\xff\xdb")
    new = {"zero quantisation table": old[:dqt + 5] + bytes(64) + old[dqt + 69:],
           "random bytes": old[:2] + bytes(np.random.default_rng(0).integers(0, 256, len(old) - 2, dtype=np.uint8)),
           "no tables": b"\xff\xd8\xff\xd9" + bytes(len(old) - 4)}[tables]
    path = shutil.copy(example_slide, tmp_path / "tables.svs")
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(new)
    a, b = (build("slide_reader", r).open(str(path)) for r in ("openslide", "openslide-library"))
    boxes = [(1000, 1000), (0, 0), (1900, 2700)]
    if tables == "zero quantisation table":
        for box in boxes:
            assert np.array_equal(a.read_region(box, 0, (T, T)), b.read_region(box, 0, (T, T)))
        assert a._direct.levels[0].verified is True
    else:
        reason = {"random bytes": "Corrupt JPEG data", "no tables": "Quantization table 0x00 was not defined"}[tables]
        for wsi in (a, b):
            with pytest.raises(SlideReadError, match=f"corrupt image data\\): {reason}"):
                wsi.read_region(boxes[0], 0, (T, T))


def test_tiles_not_a_multiple_of_16_are_served_and_identical(tmp_path):
    """TIFF asks for tile sizes in multiples of 16; a 250-px-tiled file (tags patched) still reads the same
    through the direct path, OpenSlide and tifffile."""
    t = rgb(750, 750)
    path = tiled(tmp_path / "t250.tif", [jpeg(t[y:y + 250, x:x + 250]) for y in range(0, 750, 250)
                                         for x in range(0, 750, 250)], 768)
    patch_tags(path, ImageWidth=750, ImageLength=750, TileWidth=250, TileLength=250)
    boxes = [(0, 0), (100, 100), (240, 240), (600, 600)]
    got = {}
    for reader in ("openslide", "openslide-library", "tifffile"):
        with build("slide_reader", reader).open(str(path)) as wsi:
            got[reader] = [wsi.read_region(box, 0, (200, 200)) for box in boxes]
            if reader == "openslide":
                assert wsi._direct.levels[0].tile_w == 250 and wsi._direct.levels[0].verified is True
    for box, x, y, z in zip(boxes, got["openslide"], got["openslide-library"], got["tifffile"]):
        assert np.array_equal(x, y) and np.array_equal(x, z), box


def test_a_tile_coded_unlike_the_checked_one_reads_as_openslide_reads_it(tmp_path):
    """A Photometric-RGB level of JFIF (YCbCr) tiles with one Adobe-marked RGB-coded tile (index 8, not the
    checked one). Before: the direct path decoded it by its Adobe marker (RGB) where OpenSlide reads it as
    YCbCr: different pixels, silently. Now a tile whose leading marker differs from the checked tile's is read
    by OpenSlide."""
    import imagecodecs
    import tifffile

    odd = bytes(imagecodecs.jpeg8_encode(rgb(T, T), level=90, colorspace="RGB", outcolorspace="RGB"))
    assert odd[6:11] == b"Adobe" and GOOD[6:10] == b"JFIF"
    path = tmp_path / "mixed.tif"
    tifffile.imwrite(path, iter([GOOD] * 8 + [odd]), shape=(3 * T, 3 * T, 3), dtype=np.uint8, tile=(T, T),
                     compression="jpeg", photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    a, b = (build("slide_reader", r).open(str(path)) for r in ("openslide", "openslide-library"))
    for box in [(0, 0), (T, T), (2 * T, 2 * T), (300, 400)]:
        assert np.array_equal(a.read_region(box, 0, (T, T)), b.read_region(box, 0, (T, T))), box
    assert a._direct.levels[0].verified is True and (0, 8) not in a._direct._cache and (0, 4) in a._direct._cache
