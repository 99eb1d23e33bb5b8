"""tifffile reader: OME-TIFF (little- and big-endian, classic and BigTIFF, SubIFD pyramids), Aperio SVS, NDPI and
plain tiled or stripped TIFF, decoded with imagecodecs.

Used as the fallback for files OpenSlide cannot open (e.g. the big-endian OME-TIFFs written by Bio-Formats).

mpp, first found wins (never guessed):
  1. OME-XML ``Pixels/@PhysicalSizeX|Y`` with ``PhysicalSizeXUnit|YUnit`` (default µm);
  2. Aperio ImageDescription ``MPP = ...``;
  3. TIFF ``XResolution``/``YResolution`` with ``ResolutionUnit`` inch (2) or centimetre (3).

Memory: a region read decodes only the tiles (or strips) it overlaps; the JPEG tiles of 8-bit RGB levels are
decoded once and kept in a bounded cache shared by neighbouring reads (:mod:`._jpeg_tiles`, the same
imagecodecs decode, checked per level against the uncached path); uncompressed contiguous images are
memory-mapped; the thumbnail is an area-averaged downsample of the coarsest level big enough, decoded in
blocks of at most 4,096 x 4,096 px.
"""

from __future__ import annotations

import os

import numpy as np

from gigapath_core import hookimpl
from gigapath_core.errors import SlideOpenError, SlideReadError
from gigapath_core.kinds import WSI, SlideReader
from gigapath_core.units import tiff_resolution_to_mpp

from ._jpeg_tiles import JpegTiles, jpeg_level, jpeg_tile_problem, tile_size_problem
from ._common import aperio_mpp, check_level, blockwise_thumbnail, ome_mpp, read_padded, thumbnail_level, thumbnail_size, to_rgb_uint8

_ASSOCIATED = {"label", "macro", "thumbnail", "overview"}


class _Level:
    """One pyramid level: its TiffPage and how to read a box of it."""

    def __init__(self, page, path: str):
        self.page = page
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.samples = int(page.samplesperpixel)
        self.memmap = None
        if page.compression == 1 and page.is_contiguous and not page.is_tiled and page.fillorder == 1:
            self.memmap = np.memmap(path, dtype=np.uint8, mode="r", offset=int(page.dataoffsets[0]),
                                    shape=(self.height, self.width, self.samples))
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = min(int(page.rowsperstrip or self.height), self.height), self.width
        self.n_x = -(-self.width // self.seg_w)


class TiffFileWSI(WSI):
    """An open TIFF/OME-TIFF slide read with tifffile."""

    def __init__(self, path: str):
        import tifffile

        self.path, self.reader = str(path), "tifffile"
        try:
            self._tif = tifffile.TiffFile(self.path)
        except tifffile.TiffFileError as err:
            msg = str(err)
            raise SlideOpenError(path, msg if msg.lower().startswith("not a tiff") else f"not a TIFF file ({msg})") from None
        except OSError as err:
            raise SlideOpenError(path, f"cannot read the file: {err.strerror or err}") from None
        except Exception as err:  # tifffile raises assorted errors on damaged headers
            raise SlideOpenError(path, f"damaged TIFF structure ({type(err).__name__}: {err})") from None
        try:
            self._levels = self._parse_levels()
        except BaseException:  # any failure past the open (not only SlideOpenError) closes the file
            self._tif.close()
            raise
        self._direct = None  # JpegTiles, made on the first read_region; False: no JPEG-tiled level

    # ------------------------------------------------------------------ structure
    def _main_series(self):
        candidates = [s for s in self._tif.series if (s.name or "").strip().lower() not in _ASSOCIATED]
        candidates = candidates or list(self._tif.series)
        if not candidates:
            raise SlideOpenError(self.path, "the TIFF holds no image")

        def area(s):
            kf = s.levels[0].keyframe
            return int(kf.imagewidth) * int(kf.imagelength)

        return max(candidates, key=area)

    def _parse_levels(self) -> list[_Level]:
        import tifffile

        series = self._main_series()
        self._series = series
        levels = []
        for i, lvl in enumerate(series.levels):
            page = lvl.keyframe
            if len(lvl.pages) > 1 and i == 0:
                raise SlideOpenError(self.path, f"multi-plane image (axes {series.axes}, shape {series.shape}): "
                                                "only single-plane RGB or grayscale slides are supported")
            if page.dtype != np.uint8:
                raise SlideOpenError(self.path, f"unsupported pixel type {page.dtype} ({page.bitspersample}-bit; "
                                                "only 8-bit brightfield RGB/grayscale slides are supported)")
            if page.samplesperpixel not in (1, 2, 3, 4):
                raise SlideOpenError(self.path, f"unsupported {page.samplesperpixel}-sample pixels")
            if page.samplesperpixel > 1 and page.planarconfig != 1:
                raise SlideOpenError(self.path, "planar-separate RGB TIFF is not supported (convert to interleaved "
                                                "RGB, e.g. vips tiffsave --tile --pyramid)")
            if int(page.imagedepth) > 1:
                raise SlideOpenError(self.path, "volumetric (ImageDepth > 1) TIFF is not supported")
            comp = int(page.compression)
            if comp != 1 and comp not in tifffile.TIFF.DECOMPRESSORS:
                raise SlideOpenError(self.path, f"unsupported TIFF compression {comp} (no decoder in imagecodecs)")
            if page.is_subsampled and comp not in (6, 7, 33007, 34892):
                raise SlideOpenError(self.path, "chroma-subsampled YCbCr without JPEG compression is not supported")
            levels.append(_Level(page, self.path))
        return levels

    @property
    def level_dimensions(self):
        return [(lv.width, lv.height) for lv in self._levels]

    @property
    def level_downsamples(self):
        w0, h0 = self.level_dimensions[0]
        return [float((w0 / lv.width + h0 / lv.height) / 2) for lv in self._levels]

    @property
    def mpp(self):
        tif, page = self._tif, self._levels[0].page
        if tif.is_ome:
            index = 0
            try:
                index = list(tif.series).index(self._series)
            except ValueError:
                pass
            mpp = ome_mpp(tif.ome_metadata, index)
            if mpp:
                return mpp
        mpp = aperio_mpp(page.description) if tif.is_svs else None
        if mpp:
            return mpp
        tags = page.tags
        if "XResolution" in tags and "YResolution" in tags and "ResolutionUnit" in tags:
            unit = int(tags["ResolutionUnit"].value)

            def res(tag):
                v = tags[tag].value
                return v[0] / v[1] if isinstance(v, tuple) and v[1] else float(v if not isinstance(v, tuple) else 0)

            x, y = tiff_resolution_to_mpp(res("XResolution"), unit), tiff_resolution_to_mpp(res("YResolution"), unit)
            if x and y:
                return (x, y)
        return None

    @property
    def properties(self):
        page = self._levels[0].page
        props = {"tifffile.byteorder": self._tif.byteorder, "tifffile.series": self._series.name or "",
                 "tifffile.compression": str(int(page.compression)), "tifffile.is_ome": str(self._tif.is_ome)}
        if page.description:
            props["tiff.ImageDescription"] = page.description[:2000]
        return props

    # ------------------------------------------------------------------ pixels
    def _read_inside(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Box fully inside ``level`` (level px) -> (h, w, 3) uint8; decodes only the overlapped segments."""
        lv = self._levels[level]
        if lv.memmap is not None:
            return to_rgb_uint8(np.array(lv.memmap[y:y + h, x:x + w]))
        page = lv.page
        problem = tile_size_problem(lv.seg_w, lv.seg_h)  # a segment is decoded whole
        if problem:
            raise SlideReadError(self.path, f"cannot read level {level}: {problem.replace('tiles', 'segments')}")
        check_jpeg = page.is_tiled and int(page.compression) == 7
        ty0, ty1 = y // lv.seg_h, (y + h - 1) // lv.seg_h
        tx0, tx1 = x // lv.seg_w, (x + w - 1) // lv.seg_w
        indices = [ty * lv.n_x + tx for ty in range(ty0, ty1 + 1) for tx in range(tx0, tx1 + 1)]
        out = np.full((h, w, lv.samples), 255, np.uint8)
        decode = page.decode
        fh = self._tif.filehandle
        try:
            for data, i in fh.read_segments([page.dataoffsets[i] for i in indices],
                                             [page.databytecounts[i] for i in indices],
                                             indices=indices, sort=True, lock=fh.lock):
                problem = jpeg_tile_problem(data, lv.seg_w, lv.seg_h) if check_jpeg and data else None
                if problem:  # checked before decoding: a frame bigger than the tile would be decoded whole
                    raise SlideReadError(self.path, f"cannot decode level {level} box ({x}, {y}, {w}x{h}): "
                                                    f"JPEG tile {i}: {problem}")
                seg, pos, _ = decode(data, i, jpegtables=page.jpegtables)
                if seg is None:  # empty segment (bytecount 0): leave white
                    continue
                seg = seg[0]  # (length, width, samples)
                sy, sx = int(pos[2]), int(pos[3])
                iy0, iy1 = max(y, sy), min(y + h, sy + seg.shape[0], lv.height)
                ix0, ix1 = max(x, sx), min(x + w, sx + seg.shape[1], lv.width)
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = seg[iy0 - sy:iy1 - sy, ix0 - sx:ix1 - sx]
        except SlideReadError:
            raise
        except Exception as err:  # imagecodecs/tifffile decode errors (corrupt tile, truncated file)
            raise SlideReadError(self.path, f"cannot decode level {level} box ({x}, {y}, {w}x{h}): "
                                            f"{type(err).__name__}: {err}") from None
        return to_rgb_uint8(out)

    def _direct_tiles(self):
        if self._direct is None:
            fh = self._tif.filehandle
            levels = [jpeg_level(lv.page, fh) if hasattr(os, "pread") else None for lv in self._levels]
            reference = lambda level, x, y, w, h: self._read_inside(level, x, y, w, h)  # noqa: E731
            self._direct = (JpegTiles(self.path, levels, reference) if any(lv is not None for lv in levels)
                            else False)
        return self._direct

    def read_region(self, location, level, size):
        level = check_level(level, len(self._levels))
        lv = self._levels[level]
        w0, h0 = self.level_dimensions[0]
        x = int(round(int(location[0]) * lv.width / w0))
        y = int(round(int(location[1]) * lv.height / h0))
        w, h = int(size[0]), int(size[1])
        direct = self._direct_tiles()
        out = direct.read(level, x, y, w, h) if direct else None
        if out is not None:
            return out
        return read_padded(lambda a, b, c, d: self._read_inside(level, a, b, c, d), x, y, w, h, (lv.width, lv.height))

    def thumbnail(self, max_size: int) -> np.ndarray:
        size = thumbnail_size(self.level_dimensions[0], max_size)
        level = thumbnail_level(self.level_dimensions, size)
        return blockwise_thumbnail(lambda x, y, w, h: self._read_inside(level, x, y, w, h),
                                   self.level_dimensions[level], size)

    def close(self):
        for lv in self._levels:
            lv.memmap = None
        if self._direct:
            self._direct.close()
        self._tif.close()


class TiffFileReader(SlideReader):
    """tifffile + imagecodecs (OME-TIFF incl. big-endian, SVS, NDPI, plain tiled/stripped TIFF)."""

    name = "tifffile"

    def open(self, path: str) -> WSI:
        try:
            import tifffile  # noqa: F401
        except ImportError as err:
            raise SlideOpenError(path, f"tifffile is not installed ({err}); pip install tifffile imagecodecs") from None
        return TiffFileWSI(path)


@hookimpl
def gigapath_slide_readers():
    return [TiffFileReader]
