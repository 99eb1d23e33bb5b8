"""pyvips (libvips) reader: tiled/stripped TIFF and its pyramids (page or SubIFD), OME-TIFF, plus whatever else
the installed libvips loads (JPEG, PNG, JPEG 2000 and OpenSlide formats when libvips is built with them).

Pyramid levels: SubIFDs of page 0 when present, otherwise the following *tiled* pages with the same aspect
ratio and decreasing size (the layout of ``vips tiffsave --pyramid`` and Aperio SVS; SVS thumbnail, label and
macro pages are left out).

mpp, first found wins: OME-XML PhysicalSizeX/Y in the ImageDescription; Aperio ``MPP = ...``; the TIFF
resolution (libvips ``xres``/``yres`` in px/mm) only when the file states a ``resolution-unit`` (libvips
reports 1 px/mm for files without one, which is not a measurement).
"""

from __future__ import annotations

import numpy as np

from gigapath_core import hookimpl
from gigapath_core.errors import SlideOpenError, SlideReadError
from gigapath_core.kinds import WSI, SlideReader

from ._common import aperio_mpp, check_level, ome_mpp, read_padded, thumbnail_level, thumbnail_size, to_rgb_uint8


def _jfif_in_rgb_tiff(path: str) -> bool:
    """True for a TIFF whose JPEG tiles are JFIF (YCbCr) while the TIFF says Photometric RGB (as Bio-Formats
    writes OME-TIFF): libvips then returns the raw YCbCr values as RGB (wrong colours), so we convert."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return int(page.compression) == 7 and int(page.photometric) == 2 and bool(page.is_jfif)
    except Exception:
        return False


def _ycbcr_to_rgb(arr: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 full-range YCbCr (JFIF, ITU-R BT.601) -> (h, w, 3) uint8 RGB."""
    ycc = arr.astype(np.float32)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128.0, ycc[..., 2] - 128.0
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    # libvips puts "unable to ..." first and the cause (loader: reason) after it
    detail = [ln for ln in lines[1:] if not ln.startswith("unable to")]
    return "; ".join(detail[:2]) or (lines[0] if lines else type(err).__name__)


class PyvipsWSI(WSI):
    """An open slide backed by lazily loaded ``pyvips.Image`` levels (random access)."""

    def __init__(self, path: str):
        import pyvips

        self.path, self.reader = str(path), "pyvips"
        self._pyvips = pyvips
        try:
            base = pyvips.Image.new_from_file(self.path, access="random", fail_on="error")
        except pyvips.Error as err:
            raise SlideOpenError(path, f"libvips cannot open it: {_first_line(err)}") from None
        fields = set(base.get_fields())
        self._fields = {k: base.get(k) for k in ("image-description", "resolution-unit", "vips-loader")
                        if k in fields}
        if base.format != "uchar":
            raise SlideOpenError(path, f"unsupported pixel format {base.format} (only 8-bit RGB/grayscale slides)")
        if base.bands not in (1, 2, 3, 4):
            raise SlideOpenError(path, f"unsupported {base.bands}-band image")
        self._levels = [base]
        self._load_args: list[dict] = [{}]
        loader = self._fields.get("vips-loader", "")
        self._ycbcr = False
        if loader.startswith("tiff"):
            self._find_tiff_levels(base, fields)
            self._ycbcr = base.bands == 3 and _jfif_in_rgb_tiff(self.path)
        self._xres, self._yres = float(base.xres), float(base.yres)

    def _find_tiff_levels(self, base, fields) -> None:
        pyvips = self._pyvips
        if "n-subifds" in fields and int(base.get("n-subifds")) > 0:
            candidates = [{"subifd": i} for i in range(int(base.get("n-subifds")))]
        elif "n-pages" in fields and int(base.get("n-pages")) > 1 and "tile-width" in fields:
            candidates = [{"page": i} for i in range(1, int(base.get("n-pages")))]
        else:
            return
        aspect = base.width / base.height
        for args in candidates:
            try:
                img = pyvips.Image.new_from_file(self.path, access="random", fail_on="error", **args)
            except pyvips.Error:
                continue
            prev = self._levels[-1]
            tiled = "tile-width" in img.get_fields() or "subifd" in args
            if (tiled and img.width < prev.width and img.height < prev.height and img.bands == base.bands
                    and abs(img.width / img.height - aspect) <= 0.02 * aspect):
                self._levels.append(img)
                self._load_args.append(args)

    @property
    def level_dimensions(self):
        return [(int(im.width), int(im.height)) for im in self._levels]

    @property
    def level_downsamples(self):
        w0, h0 = self.level_dimensions[0]
        return [float((w0 / w + h0 / h) / 2) for w, h in self.level_dimensions]

    @property
    def mpp(self):
        desc = self._fields.get("image-description")
        if isinstance(desc, str):
            mpp = ome_mpp(desc) if "<OME" in desc else aperio_mpp(desc)
            if mpp:
                return mpp
        if "resolution-unit" in self._fields and self._xres > 1.0 and self._yres > 1.0:
            return (1000.0 / self._xres, 1000.0 / self._yres)  # libvips resolution is px/mm in any unit
        return None

    @property
    def properties(self):
        return {f"vips.{k}": str(v)[:2000] for k, v in self._fields.items()}

    def _read_inside(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        try:
            arr = self._levels[level].crop(x, y, w, h).numpy()
        except self._pyvips.Error as err:
            raise SlideReadError(self.path, f"cannot decode level {level} box ({x}, {y}, {w}x{h}): "
                                            f"{_first_line(err)}") from None
        return _ycbcr_to_rgb(arr) if self._ycbcr else to_rgb_uint8(arr)

    def read_region(self, location, level, size):
        level = check_level(level, len(self._levels))
        lw, lh = self.level_dimensions[level]
        w0, h0 = self.level_dimensions[0]
        x = int(round(int(location[0]) * lw / w0))
        y = int(round(int(location[1]) * lh / h0))
        return read_padded(lambda a, b, c, d: self._read_inside(level, a, b, c, d), x, y, int(size[0]), int(size[1]),
                           (lw, lh))

    def _jpeg_shrink(self, size: tuple[int, int]) -> int:
        """JPEG shrink-on-load factor (1, 2, 4 or 8: libvips decodes the DCT at 1/factor) that still gives at
        least ``size``; 1 for anything but a single-level JPEG."""
        if not self._fields.get("vips-loader", "").startswith("jpegload") or len(self._levels) != 1:
            return 1
        w, h = self.level_dimensions[0]
        factor = 1
        while factor < 8 and w // (factor * 2) >= size[0] and h // (factor * 2) >= size[1]:
            factor *= 2
        return factor

    def thumbnail_cost(self, size):
        level, px = super().thumbnail_cost(size)
        return level, px // self._jpeg_shrink(size) ** 2

    def thumbnail(self, max_size: int) -> np.ndarray:
        """libvips ``thumbnail`` with JPEG shrink-on-load for a plain JPEG (decodes 1/4 to 1/64 of the pixels);
        otherwise ``resize`` (streaming, bounded memory) of the coarsest level big enough."""
        size = thumbnail_size(self.level_dimensions[0], max_size)
        level = thumbnail_level(self.level_dimensions, size)
        img = self._levels[level]
        try:
            if self._jpeg_shrink(size) > 1:
                thumb = self._pyvips.Image.thumbnail(self.path, size[0], height=size[1], size="force",
                                                     fail_on="error")
            else:
                thumb = img.resize(size[0] / img.width, vscale=size[1] / img.height, kernel="linear") \
                    if (img.width, img.height) != size else img
            # reduce = area-aware shrink + linear; vips streams it in strips
            arr = thumb.numpy()
        except self._pyvips.Error as err:
            raise SlideReadError(self.path, f"cannot decode the thumbnail: {_first_line(err)}") from None
        arr = _ycbcr_to_rgb(arr) if self._ycbcr else to_rgb_uint8(arr)
        if arr.shape[:2] != (size[1], size[0]):
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BOX))
        return arr


class PyvipsReader(SlideReader):
    """libvips (TIFF pyramids, OME-TIFF, SVS via tiffload; other formats the libvips build supports)."""

    name = "pyvips"

    def open(self, path: str) -> WSI:
        try:
            import pyvips  # noqa: F401
        except (ImportError, OSError) as err:
            raise SlideOpenError(path, f"pyvips is not usable ({err}); pip install pyvips pyvips-binary") from None
        return PyvipsWSI(path)


@hookimpl
def gigapath_slide_readers():
    return [PyvipsReader]
