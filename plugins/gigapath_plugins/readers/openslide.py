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

import numpy as np

from gigapath_core import hookimpl
from gigapath_core.errors import SlideOpenError, SlideReadError
from gigapath_core.kinds import WSI, SlideReader
from gigapath_core.units import tiff_resolution_to_mpp

from ._jpeg_tiles import TIFF_VENDORS, JpegTiles, map_levels
from ._common import THUMBNAIL_BLOCK_PX, blockwise_thumbnail, check_level, thumbnail_level, thumbnail_size


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
        self._direct = None  # JpegTiles, made on the first read_region; False: not applicable
        if not direct or self._props.get("openslide.vendor") not in TIFF_VENDORS or not hasattr(os, "pread"):
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

    def _reopen(self) -> None:
        """OpenSlide handles are unusable after an error: reopen so that other regions can still be read."""
        import openslide

        try:
            self._slide.close()
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError:
            pass

    def _direct_tiles(self):
        """The :class:`JpegTiles` of this file, made once (False when no level can be decoded directly)."""
        if self._direct is None:
            try:
                levels = map_levels(self.path, self._dims)
            except Exception:  # tifffile cannot parse what OpenSlide opened: OpenSlide reads everything
                levels = []
            # level px = level-0 px / ds are whole pixels (no resampling in OpenSlide) only for an integer ds
            levels = [lv if ds == round(ds) else None for lv, ds in zip(levels, self._downsamples)]
            served = any(lv is not None for lv in levels)
            self._direct = JpegTiles(self.path, levels, self._reference_read) if served else False
        return self._direct

    def _reference_read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """OpenSlide's pixels of the (x, y, w, h) box in ``level`` px (integer-downsample levels only)."""
        ds = round(self._downsamples[level])
        return self._openslide_read(x * ds, y * ds, level, w, h)

    def read_region(self, location, level, size):
        x, y = int(location[0]), int(location[1])
        level = check_level(level, len(self._dims))
        w, h = int(size[0]), int(size[1])
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

        try:
            img = self._slide.read_region((x, y), level, (w, h))
        except openslide.OpenSlideError as err:
            self._reopen()
            raise SlideReadError(self.path, f"cannot decode the region at level-0 ({x}, {y}), level {level} "
                                            f"(corrupt image data): {err}") from None
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
        try:
            if lw * lh <= 4 * THUMBNAIL_BLOCK_PX**2:
                img = self._slide.get_thumbnail(size).convert("RGB")
                if img.size != size:  # PIL's aspect-ratio rounding may differ by a pixel
                    img = img.resize(size, Image.Resampling.BOX)
                return np.asarray(img)
            ds = self.level_downsamples[level]
            return blockwise_thumbnail(
                lambda x, y, w, h: self.read_region((round(x * ds), round(y * ds)), level, (w, h)), (lw, lh), size
            )
        except openslide.OpenSlideError as err:
            self._reopen()
            raise SlideReadError(self.path, f"cannot decode the thumbnail (corrupt image data): {err}") from None

    def close(self):
        if self._direct:
            self._direct.close()
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
