"""OpenSlide reader: Aperio SVS, Hamamatsu NDPI/VMS, MIRAX, Philips TIFF, Leica SCN, Ventana BIF, generic tiled
TIFF and DICOM WSI, through openslide-python with the openslide-bin wheel (no system library needed).

mpp: ``openslide.mpp-x``/``-y`` (OpenSlide fills them from the vendor metadata, e.g. Aperio ``MPP``, DICOM
PixelSpacing); for a generic TIFF without them, the TIFF ``XResolution``/``YResolution`` with
``ResolutionUnit`` inch or centimetre. Nothing is guessed: no metadata gives ``mpp is None``.

Pixels: on Aperio SVS and generic tiled TIFF, the JPEG-tiled levels are decoded directly and cached
(:mod:`._jpeg_tiles`, pixel-identical to OpenSlide's ``read_region``, checked per level on first use; ~2-3x
faster per 256-px tile); every other level, format or region goes through ``read_region``. The reader
``openslide-library`` reads every pixel through ``read_region`` (``readers: [openslide-library, ...]``).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from gigapath_core import hookimpl
from gigapath_core.errors import SlideOpenError, SlideReadError
from gigapath_core.kinds import WSI, SlideReader
from gigapath_core.units import tiff_resolution_to_mpp

from ._jpeg_tiles import TIFF_VENDORS, JpegTiles, map_levels, tile_size_problem
from ._common import (THUMBNAIL_BLOCK_PX, blockwise_thumbnail, check_level, check_unchanged, file_stamp,
                      thumbnail_level, thumbnail_size)


#: OpenSlide reads of one region: a read that fails is retried on a fresh handle (see _openslide_read)
_READ_ATTEMPTS = 3


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 non-premultiplied RGBA from openslide-python -> (h, w, 3) RGB composited on white.

    OpenSlide returns alpha 0 outside the scanned area (and partial alpha on the edge of some formats).
    """
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.rint(rgba[..., :3].astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)


class OpenSlideWSI(WSI):
    """An open slide backed by ``openslide.OpenSlide``.

    Args:
        direct: decode the JPEG tiles of Aperio / generic-TIFF levels directly (:mod:`._jpeg_tiles`) where it is
            pixel-identical; False reads every pixel through ``openslide.OpenSlide.read_region``.
        reader: the reader name recorded in the outputs.
    """

    def __init__(self, path: str, direct: bool = True, reader: str = "openslide"):
        import openslide

        self.path, self.reader = str(path), reader
        self._stamp = file_stamp(self.path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideOpenError(path, "not a slide format OpenSlide recognises") from None
        except openslide.OpenSlideError as err:
            raise SlideOpenError(path, f"OpenSlide cannot open it: {err}") from None
        except OSError as err:
            raise SlideOpenError(path, f"cannot read the file: {err.strerror or err}") from None
        # metadata is cached: after a decode error an OpenSlide handle fails every later call
        self._dims = [tuple(map(int, d)) for d in self._slide.level_dimensions]
        self._downsamples = [float(d) for d in self._slide.level_downsamples]
        self._props = dict(self._slide.properties)
        self._lock = threading.Lock()  # guards _slide and _users (reads from several threads)
        self._pid = os.getpid()
        self._users: dict = {}  # handle -> reads in progress; a replaced handle is closed when its last read ends
        self._direct = None  # JpegTiles, made on the first read_region; False: not applicable
        self._tiff = self._props.get("openslide.vendor") in TIFF_VENDORS
        self._tiles = None if self._tiff else []  # (tile w, h) per level of a TIFF vendor, read on first use
        if not (direct and self._tiff and hasattr(os, "pread")):
            self._direct = False

    @property
    def level_dimensions(self):
        return list(self._dims)

    @property
    def level_downsamples(self):
        return list(self._downsamples)

    @property
    def mpp(self):
        props = self._props
        try:
            x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
            if x > 0 and y > 0:
                return (x, y)
        except (KeyError, ValueError):
            pass
        unit = props.get("tiff.ResolutionUnit")
        try:
            x = tiff_resolution_to_mpp(float(props["tiff.XResolution"]), unit)
            y = tiff_resolution_to_mpp(float(props["tiff.YResolution"]), unit)
        except (KeyError, ValueError):
            return None
        return (x, y) if x and y else None

    @property
    def properties(self):
        return dict(self._props)

    def _after_fork(self) -> None:
        if os.getpid() != self._pid:  # a forked child: fresh lock (a parent thread may hold it), no readers
            self._pid, self._lock, self._users = os.getpid(), threading.Lock(), {}

    def _acquire(self):
        self._after_fork()
        with self._lock:
            slide = self._slide
            self._users[slide] = self._users.get(slide, 0) + 1
            return slide

    def _release(self, slide) -> None:
        with self._lock:
            self._users[slide] -= 1
            if not self._users[slide]:
                del self._users[slide]
                if slide is not self._slide:  # replaced after an error and no longer read: close it now
                    slide.close()

    def _reopen(self, failed) -> None:
        """OpenSlide handles are unusable after an error: replace ``failed`` (the handle that raised, still held
        by the caller) so that other regions can still be read.

        Threads: only the first thread to see a handle fail replaces it, and a replaced handle is closed when
        the last read inside it ends (closing it under another thread's read made OpenSlide abort the process:
        "_openslide_tiffcache_destroy: assertion failed")."""
        import openslide

        with self._lock:
            if self._slide is failed:
                try:
                    self._slide = openslide.OpenSlide(self.path)
                except (openslide.OpenSlideError, OSError):
                    pass

    def _layout(self) -> None:
        """Reads the TIFF layout once (Aperio / generic TIFF): the tile size of each level, and the
        :class:`JpegTiles` of the levels that can be decoded directly (``_direct``; False when none)."""
        self._after_fork()
        with self._lock:
            if self._tiles is not None:
                return
            try:
                levels, self._tiles = map_levels(self.path, self._dims)
            except Exception:  # tifffile cannot parse what OpenSlide opened: OpenSlide reads everything
                levels, self._tiles = [], []
            if self._direct is None:
                # level px = level-0 px / ds are whole pixels (no resampling in OpenSlide) only for an integer ds
                levels = [lv if ds == round(ds) else None for lv, ds in zip(levels, self._downsamples)]
                served = any(lv is not None for lv in levels)
                self._direct = JpegTiles(self.path, levels, self._reference_read) if served else False

    def _direct_tiles(self):
        """The :class:`JpegTiles` of this file, made once (False when no level can be decoded directly)."""
        if self._direct is None:
            self._layout()
        return self._direct

    def _check_tiles(self, levels) -> None:
        """SlideReadError when a level in ``levels`` is stored in tiles over MAX_TILE_PX: OpenSlide decodes a
        whole tile for any read inside it (a 65,488 px tile: 17 GB, or a GLib abort of the process)."""
        if self._tiles is None:
            self._layout()
        for level in levels:
            tile = self._tiles[level] if level < len(self._tiles) else None
            problem = tile_size_problem(*tile) if tile else None
            if problem:
                raise SlideReadError(self.path, f"cannot read level {level}: {problem}")

    def _reference_read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's pixels of the (x, y, w, h) box in ``level`` px (integer-downsample levels only)."""
        ds = round(self._downsamples[level])
        return self._openslide_read(x * ds, y * ds, level, w, h)

    def read_region(self, location, level, size):
        x, y = int(location[0]), int(location[1])
        level = check_level(level, len(self._dims))
        w, h = int(size[0]), int(size[1])
        self._check_tiles([level])
        direct = self._direct_tiles() if self._direct is not False else False
        if direct:
            ds = round(self._downsamples[level])
            if x % ds == 0 and y % ds == 0:  # openslide reads level px x / ds: whole pixels, no resampling
                out = direct.read(level, x // ds, y // ds, w, h)
                if out is not None:
                    return out
        return self._openslide_read(x, y, level, w, h)

    def _openslide_read(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        import openslide

        # OpenSlide may open the path again: refuse a file that is no longer the one opened (the direct path
        # reads the opened file through its own descriptor, so its pixels never mix two files)
        check_unchanged(self.path, self._stamp)
        # an error is reported only if it repeats on fresh handles: a handle that failed once fails every later
        # call, so a thread sharing it with a failing read would otherwise report a good region as corrupt
        for attempt in range(_READ_ATTEMPTS):
            slide = self._acquire()
            try:
                img = slide.read_region((x, y), level, (w, h))
                break
            except openslide.OpenSlideError as err:
                self._reopen(slide)
                if attempt == _READ_ATTEMPTS - 1:
                    raise SlideReadError(self.path, f"cannot decode the region at level-0 ({x}, {y}), level "
                                                    f"{level} (corrupt image data): {err}") from None
            finally:
                self._release(slide)
        # fully opaque (the common case)? The alpha band's minimum, in C (5x faster than scanning tobytes())
        if img.getchannel("A").getextrema()[0] == 255:
            return np.asarray(img.convert("RGB")).copy()  # PIL's C conversion; np.array(img) is 2x slower
        return _rgba_to_rgb(np.asarray(img))

    def thumbnail(self, max_size: int) -> np.ndarray:
        """OpenSlide ``get_thumbnail`` when the level it decodes is small enough (<= 64 Mpx); otherwise a
        block-wise area-averaged downsample of the coarsest level, so memory stays bounded."""
        import openslide
        from PIL import Image

        size = thumbnail_size(self.level_dimensions[0], max_size)
        level = thumbnail_level(self.level_dimensions, size)
        lw, lh = self.level_dimensions[level]
        check_unchanged(self.path, self._stamp)
        self._check_tiles(range(len(self._dims)))  # get_thumbnail decodes a level of its own choosing
        slide = self._acquire()
        try:
            if lw * lh <= 4 * THUMBNAIL_BLOCK_PX**2:
                img = slide.get_thumbnail(size).convert("RGB")
                if img.size != size:  # PIL's aspect-ratio rounding may differ by a pixel
                    img = img.resize(size, Image.Resampling.BOX)
                return np.asarray(img)
            ds = self.level_downsamples[level]
            return blockwise_thumbnail(
                lambda x, y, w, h: self.read_region((round(x * ds), round(y * ds)), level, (w, h)), (lw, lh), size
            )
        except openslide.OpenSlideError as err:
            self._reopen(slide)
            raise SlideReadError(self.path, f"cannot decode the thumbnail (corrupt image data): {err}") from None
        finally:
            self._release(slide)

    def close(self):
        if self._direct:
            self._direct.close()
        with self._lock:
            replaced = [s for s in self._users if s is not self._slide]
            self._users = {}
        for slide in replaced:  # handles still read by another thread: closed with the slide
            slide.close()
        self._slide.close()


class OpenSlideReader(SlideReader):
    """OpenSlide (SVS, NDPI, MRXS, SCN, BIF, Philips/generic tiled TIFF, DICOM WSI)."""

    name = "openslide"

    def open(self, path: str) -> WSI:
        try:
            import openslide  # noqa: F401
        except ImportError as err:
            raise SlideOpenError(path, f"openslide-python is not installed ({err}); pip install openslide-python openslide-bin") from None
        return OpenSlideWSI(path, direct=self.direct, reader=self.name)

    #: decode JPEG-tiled TIFF levels directly where that is pixel-identical (see the module docstring)
    direct = True


class OpenSlideLibraryReader(OpenSlideReader):
    """OpenSlide, every pixel through ``read_region`` (no direct JPEG decoding; for comparison or a file where
    the direct path misbehaves)."""

    name = "openslide-library"
    direct = False


@hookimpl
def gigapath_slide_readers():
    return [OpenSlideReader, OpenSlideLibraryReader]
