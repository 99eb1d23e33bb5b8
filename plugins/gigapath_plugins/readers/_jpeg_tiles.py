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

Hostile files: a tile is decoded only after its own JPEG header was checked (:func:`jpeg_tile_problem`): a
frame size other than the TIFF tile's (a 20,000 x 20,000 px claim in a 256-px tile would otherwise be decoded
whole before any shape check), other than 3 colour components (OpenSlide refuses grey or CMYK tiles of an RGB
page), or no end-of-image marker (libjpeg-turbo, as imagecodecs runs it, pads a truncated tile with grey where
OpenSlide fails) sends the read to the caller's library, which reports it; so do byte counts past the end of
the file or far beyond any JPEG of the tile's size (nothing that size is allocated), and tiles over a quarter of
the cache. Left undetected: entropy-coded data corrupted in place with the markers intact (libjpeg only warns,
and imagecodecs does not report warnings), which OpenSlide refuses in some cases and this path decodes to
garbage pixels, as the ``tifffile`` reader always has. A tile whose leading JFIF / Adobe marker differs from
the checked tile's is left to the library too (the colour transform is read from those markers). :data:`MAX_TILE_PX` bounds the tiles any reader decodes.

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
#: largest TIFF tile (px) the readers decode: OpenSlide and tifffile decode a whole tile for any part of it, so
#: one crafted 65,488 x 65,488 px tile (a valid JPEG size) makes OpenSlide allocate and decode 17 GB (GLib
#: aborts the process when it cannot allocate). Real slides use 240-1,024 px tiles; 16,384² px is 768 MB RGB,
#: 1 GiB in OpenSlide's ARGB buffer.
MAX_TILE_PX = 16384 * 16384
_JPEG = 7
_RGB, _YCBCR = 2, 6
#: JPEG start-of-frame markers (ITU-T T.81 table B.1: SOF0-SOF15 except DHT C4, JPG C8, DAC CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from the frame header (SOF) of a JPEG stream, or None when the stream does
    not start with SOI or has no frame header before its first scan (T.81 annex B marker syntax)."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
        elif m == 0x01 or 0xD0 <= m <= 0xD7:  # TEM, RSTn: no length
            i += 2
        elif m in (0xDA, 0xD9):  # scan or end of image before any frame header
            return None
        elif m in _SOF:
            if i + 10 > n:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big"), data[i + 9]
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def jpeg_marker(data: bytes) -> bytes:
    """The marker after SOI and, for a JFIF (APP0) or Adobe (APP14) segment, its identifier and Adobe's colour
    transform: what decides how libjpeg and OpenSlide read the colours of a tile."""
    head = data[2:4]
    if head in (b"\xff\xe0", b"\xff\xee"):
        head += data[6:11] + (data[17:18] if head == b"\xff\xee" else b"")
    return head


def jpeg_tile_problem(data: bytes, tile_w: int, tile_h: int, components: int | None = None) -> str | None:
    """Why a TIFF JPEG tile must not be decoded, or None. Checks only its header and ending: the frame size must
    be the tile's (else the decoder would allocate the claimed size first), and the stream must end with EOI
    (trailing zero padding allowed); a stream cut short is decoded by imagecodecs with grey fill and no error.
    ``components``: also require that many colour components."""
    frame = jpeg_frame(data)
    if frame is None:
        return "not a JPEG stream with a frame header"
    if frame[:2] != (tile_w, tile_h):
        return f"its JPEG header says {frame[0]} x {frame[1]} px, the TIFF tile is {tile_w} x {tile_h} px"
    if components is not None and frame[2] != components:
        return f"{frame[2]} colour components in its JPEG header, not {components}"
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return "truncated JPEG data (no end-of-image marker)"
    return None


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
    marker: bytes | None = None  # the first decoded tile's leading marker (see jpeg_marker): every tile's must match


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


def map_levels(path: str, level_dimensions: list[tuple[int, int]]
               ) -> tuple[list[JpegLevel | None], list[tuple[int, int] | None]]:
    """For each level (w, h), the JPEG-tiled TIFF page of exactly that size in the file's IFD chain (or None),
    and the (tile width, tile length) of the tiled page of that size, whatever its compression (or None)."""
    import tifffile

    out: list[JpegLevel | None] = [None] * len(level_dimensions)
    tiles: list[tuple[int, int] | None] = [None] * len(level_dimensions)
    with tifffile.TiffFile(path) as tif:
        pages = {}
        for page in tif.pages:
            key = (int(page.imagewidth), int(page.imagelength))
            if getattr(page, "is_tiled", False) and key not in pages:
                pages[key] = page
        for i, dims in enumerate(level_dimensions):
            page = pages.get(tuple(dims))
            if page is not None:
                tiles[i] = (int(page.tilewidth), int(page.tilelength))
                out[i] = jpeg_level(page, tif.filehandle)
    return out, tiles


def tile_size_problem(tile_w: int, tile_h: int) -> str | None:
    """A reason when a (tile_w, tile_h) px tile is over :data:`MAX_TILE_PX`, else None."""
    if tile_w * tile_h <= MAX_TILE_PX:
        return None
    return (f"its tiles are {tile_w:,} x {tile_h:,} px, over the {MAX_TILE_PX / 1e6:,.0f} Mpx a reader decodes at "
            "once (a tile is decoded whole: a crafted or broken file)")


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
        self._size = os.fstat(self._fd).st_size
        self._closer = weakref.finalize(self, os.close, self._fd)  # closes the file if close() is never called
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._verify_lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
        self._cached = 0

    # ------------------------------------------------------------------ tiles
    def _decode(self, lv: JpegLevel, index: int) -> np.ndarray:
        import imagecodecs

        n, offset = int(lv.counts[index]), int(lv.offsets[index])
        if offset < 0 or n > self._size - offset or n > 2 * lv.tile_w * lv.tile_h * 3 + 2**16:
            raise ValueError(f"JPEG tile {index}: {n} bytes at {offset} (file {self._size} bytes)")
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise OSError(f"short read of JPEG tile {index} ({len(data)} of {n} bytes)")
        problem = jpeg_tile_problem(data, lv.tile_w, lv.tile_h, components=3)
        marker = jpeg_marker(data)
        if lv.marker is None:  # the level's first decoded tile: the one compared with the reference
            lv.marker = marker
        elif problem is None and marker != lv.marker:
            # e.g. an Adobe RGB tile among JFIF ones: OpenSlide and libjpeg may read its colours differently
            problem = f"leading marker {marker!r}, not {lv.marker!r} as the level's checked tile"
        if problem:
            raise ValueError(f"JPEG tile {index}: {problem}")
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
            self._pid, self._lock, self._verify_lock = os.getpid(), threading.Lock(), threading.Lock()
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
        if lv is None or lv.verified is False or w <= 0 or h <= 0 or lv.tile_w * lv.tile_h * 3 > self.cache_bytes // 4:
            return None  # (a tile over a quarter of the cache is left to the library: never cached)
        self._after_fork()
        if lv.verified is None:
            # one thread checks, the others wait: a check racing other threads' failing library reads (which
            # can leave a shared OpenSlide handle failing) would turn the whole level over to the library
            with self._verify_lock:
                if lv.verified is None:
                    try:
                        lv.verified = self._verify(level, lv)
                    except Exception:  # the check itself failed (e.g. a corrupt tile): the library reads the level
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
