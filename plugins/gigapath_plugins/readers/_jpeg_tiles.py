"""Direct decoding of JPEG-tiled TIFF levels (Aperio SVS, generic tiled TIFF), with a small cache of decoded tiles.

OpenSlide's ``read_region`` decodes the same JPEG tiles with libjpeg-turbo (default integer DCT, fancy
upsampling) but then paints them through cairo into a premultiplied ARGB buffer, which openslide-python
un-premultiplies to RGBA and PIL converts to RGB: on a 256-px tile that costs more than the JPEG decode itself
(issue #16 item 2). Here each JPEG tile is read with ``os.pread`` and decoded once by ``imagecodecs.jpeg8_decode``
(libjpeg-turbo with the same defaults; JPEGTables prepended for abbreviated SVS streams; Aperio's RGB-coded
JPEG told apart from YCbCr by the TIFF ``Photometric`` tag, as tifffile's ``jpeg_decode_colorspace`` does), kept
in a bounded LRU cache (tiles are read row-major, so neighbouring reads share JPEG tiles), and a region is
assembled from the decoded tiles with numpy slicing. Parts of a region outside the level are white, as the
readers' contract says (OpenSlide returns them transparent; :class:`OpenSlideWSI` composites them on white).

Safety: a level is served only when its TIFF page is tiled, JPEG (compression 7), 8-bit, 3 samples,
interleaved, Photometric RGB or YCbCr, and has the level's exact size; and only once one of its tiles decoded
here equals OpenSlide's ``read_region`` of the same pixels (checked on the level's first read, in each
process). Anything else — other compressions, stripped levels, empty (sparse) tiles, undecodable data — returns
None and the caller reads through OpenSlide, so pixels and errors stay OpenSlide's.

Processes and threads: nothing is shared across ``fork`` that could break — the file is read with ``pread``
(no shared file offset), and a child that inherits the object replaces its lock and empties its cache on first
use. The cache is guarded by a lock, so one object may be read from several threads.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: bytes of decoded JPEG tiles kept per open slide (per process): ~340 tiles of 256 x 256 x 3, i.e. a few tile
#: rows of a 20k-px-wide slide, so row-major reads decode each JPEG tile once
CACHE_BYTES = 64 * 2**20
#: OpenSlide vendors whose pyramid levels are TIFF pages read tile by tile (openslide src/openslide-vendor-*.c)
TIFF_VENDORS = ("aperio", "generic-tiff")
_JPEG = 7
_RGB, _YCBCR = 2, 6


@dataclass
class JpegLevel:
    """One JPEG-tiled TIFF page: where its tiles are and how to decode them."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    n_x: int
    offsets: np.ndarray  # (n_tiles,) int64 file offsets, row-major
    counts: np.ndarray  # (n_tiles,) int64 byte counts; 0 = tile absent
    tables: bytes | None
    colorspace: int | None
    verified: bool | None = None  # None: not yet compared with the reference


def jpeg_level(page, fh) -> JpegLevel | None:
    """A :class:`JpegLevel` for a tifffile page, or None when it is not a plain 8-bit RGB JPEG-tiled page."""
    import imagecodecs

    try:
        if not (page.is_tiled and int(page.compression) == _JPEG and int(page.bitspersample) == 8
                and int(page.samplesperpixel) == 3 and int(page.planarconfig) == 1 and int(page.imagedepth) == 1
                and int(page.photometric) in (_RGB, _YCBCR) and not page.extrasamples):
            return None
        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        tw, th = int(page.tilewidth), int(page.tilelength)
        w, h = int(page.imagewidth), int(page.imagelength)
        n_x = -(-w // tw)
        if len(offsets) != n_x * -(-h // th) or len(counts) != len(offsets):
            return None
        colorspace = None  # YCbCr: libjpeg's default for 3 components
        if int(page.photometric) == _RGB:
            # Aperio writes RGB-coded JPEG without a JFIF marker: libjpeg would take it for YCbCr unless told
            first = int(np.argmax(counts > 0))
            with fh.lock:  # tifffile's FileHandle: shared position
                fh.seek(int(offsets[first]) + 6)
                jfif = fh.read(4) == b"JFIF"
            colorspace = None if jfif else int(imagecodecs.JPEG8.CS.RGB)
        tables = page.jpegtables
        return JpegLevel(w, h, tw, th, n_x, offsets, counts, bytes(tables) if tables else None, colorspace)
    except Exception:  # an odd page: leave it to OpenSlide
        return None


def map_levels(path: str, level_dimensions: list[tuple[int, int]]) -> list[JpegLevel | None]:
    """For each level (w, h), the JPEG-tiled TIFF page of exactly that size in the file's IFD chain, or None."""
    import tifffile

    out: list[JpegLevel | None] = [None] * len(level_dimensions)
    with tifffile.TiffFile(path) as tif:
        pages = {}
        for page in tif.pages:
            key = (int(page.imagewidth), int(page.imagelength))
            if getattr(page, "is_tiled", False) and key not in pages:
                pages[key] = page
        for i, dims in enumerate(level_dimensions):
            page = pages.get(tuple(dims))
            if page is not None:
                out[i] = jpeg_level(page, tif.filehandle)
    return out


class JpegTiles:
    """Region reads of the JPEG-tiled levels of one TIFF file, decoded directly and cached.

    Args:
        path: the TIFF/SVS file.
        levels: from :func:`map_levels`, one entry per pyramid level (None = not served here).
        reference: ``(level, x, y, w, h)`` in level px -> (h, w, 3) uint8 RGB as the caller's library reads
            it; used once per level to check that the direct decode is pixel-identical.
        cache_bytes: bound on the decoded tiles kept.
    """

    def __init__(self, path: str, levels: list[JpegLevel | None],
                 reference: Callable[[int, int, int, int, int], np.ndarray], cache_bytes: int = CACHE_BYTES):
        self.path, self.levels, self._reference = path, levels, reference
        self.cache_bytes = int(cache_bytes)
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._closer = weakref.finalize(self, os.close, self._fd)  # closes the file if close() is never called
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._cached = 0

    # ------------------------------------------------------------------ tiles
    def _decode(self, lv: JpegLevel, index: int) -> np.ndarray:
        import imagecodecs

        n = int(lv.counts[index])
        data = os.pread(self._fd, n, int(lv.offsets[index]))
        if len(data) != n:
            raise OSError(f"short read of JPEG tile {index} ({len(data)} of {n} bytes)")
        tile = imagecodecs.jpeg8_decode(data, tables=lv.tables, colorspace=lv.colorspace,
                                        outcolorspace=imagecodecs.JPEG8.CS.RGB)
        if tile.shape != (lv.tile_h, lv.tile_w, 3) or tile.dtype != np.uint8:
            raise ValueError(f"JPEG tile {index} decodes to {tile.shape} {tile.dtype}")
        return tile

    def _tile(self, level: int, lv: JpegLevel, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
        tile = self._decode(lv, index)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached += tile.nbytes
                while self._cached > self.cache_bytes and len(self._cache) > 1:
                    self._cached -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child: fresh lock (the parent's may be held), own cache
            self._pid, self._lock = os.getpid(), threading.Lock()
            self._cache, self._cached = collections.OrderedDict(), 0

    # ------------------------------------------------------------------ regions
    def _assemble(self, level: int, lv: JpegLevel, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        ix0, iy0, ix1, iy1 = max(x, 0), max(y, 0), min(x + w, lv.width), min(y + h, lv.height)
        inside = ix0 == x and iy0 == y and ix1 == x + w and iy1 == y + h
        if ix1 <= ix0 or iy1 <= iy0:
            return np.full((h, w, 3), 255, np.uint8)
        tx0, tx1 = ix0 // lv.tile_w, (ix1 - 1) // lv.tile_w
        ty0, ty1 = iy0 // lv.tile_h, (iy1 - 1) // lv.tile_h
        indices = [ty * lv.n_x + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        if not all(lv.counts[indices]):  # a sparse (absent) tile: OpenSlide knows how to draw it
            return None
        if len(indices) == 1 and inside:  # the whole region in one JPEG tile
            tile = self._tile(level, lv, indices[0])
            sx, sy = tx0 * lv.tile_w, ty0 * lv.tile_h
            return tile[y - sy:y - sy + h, x - sx:x - sx + w].copy()
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        for index in indices:
            ty, tx = divmod(index, lv.n_x)
            sx, sy = tx * lv.tile_w, ty * lv.tile_h
            cx0, cy0 = max(ix0, sx), max(iy0, sy)
            cx1, cy1 = min(ix1, sx + lv.tile_w), min(iy1, sy + lv.tile_h)
            tile = self._tile(level, lv, index)
            out[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = tile[cy0 - sy:cy1 - sy, cx0 - sx:cx1 - sx]
        return out

    def _verify(self, level: int, lv: JpegLevel) -> bool:
        """Whether the level's central JPEG tile decodes here exactly as the reference library reads it."""
        n_y = -(-lv.height // lv.tile_h)
        index = (n_y // 2) * lv.n_x + lv.n_x // 2
        present = np.flatnonzero(lv.counts)
        if not len(present):
            return False
        index = int(present[np.argmin(np.abs(present - index))])
        ty, tx = divmod(index, lv.n_x)
        x, y = tx * lv.tile_w, ty * lv.tile_h
        w, h = min(lv.tile_w, lv.width - x), min(lv.tile_h, lv.height - y)
        ours = self._tile(level, lv, index)[:h, :w]
        theirs = self._reference(level, x, y, w, h)
        return theirs.shape == ours.shape and bool(np.array_equal(theirs, ours))

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """(h, w, 3) uint8 RGB of the box at (x, y) in ``level`` px, white outside the level; None when this
        level or box is not served here (the caller then reads it through its library)."""
        lv = self.levels[level] if 0 <= level < len(self.levels) else None
        if lv is None or lv.verified is False or w <= 0 or h <= 0:
            return None
        self._after_fork()
        if lv.verified is None:
            try:
                lv.verified = self._verify(level, lv)
            except Exception:  # the check itself failed (e.g. a corrupt tile): leave the level to the library
                lv.verified = False
            if not lv.verified:  # drop what was decoded for the check
                with self._lock:
                    for key in [k for k in self._cache if k[0] == level]:
                        self._cached -= self._cache.pop(key).nbytes
                return None
        try:
            return self._assemble(level, lv, x, y, w, h)
        except Exception:  # undecodable data, I/O error: the caller's library reads it (and reports the error)
            return None

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached = 0
        self._closer()  # os.close once
        self._fd = -1
