"""TIAToolbox reader (optional extra): ``tiatoolbox.wsicore.wsireader.WSIReader.open`` picks OpenSlide, tifffile
(OME-TIFF, generic TIFF), JPEG 2000, NGFF/Zarr, DICOM (with ``wsidicom``) or an in-memory reader for plain
images.

tiatoolbox 2.1.3 pins torch<2.13 and pulls in jupyterlab, bokeh, flask...; it is not a core dependency. Its
WSI reader needs only a few packages, installed without touching torch::

    pip install --no-deps tiatoolbox==2.1.3
    pip install opencv-python-headless pandas SimpleITK zarr defusedxml universal-pathlib dask psutil requests shapely

mpp comes from tiatoolbox's ``WSIMeta.mpp`` (None when it has none: never the 0.25 some tools assume).
Note: for plain images (PNG, JPEG, stripped TIFF) tiatoolbox's ``VirtualWSIReader`` holds the whole image
in memory; prefer the ``tifffile`` or ``pyvips`` reader for those.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import numpy as np

from gigapath_core import hookimpl
from gigapath_core.errors import SlideOpenError, SlideReadError
from gigapath_core.kinds import WSI, SlideReader

from ._common import blockwise_thumbnail, check_level, thumbnail_level, thumbnail_size, to_rgb_uint8

INSTALL_HINT = ("pip install --no-deps tiatoolbox==2.1.3 && pip install opencv-python-headless pandas SimpleITK zarr "
                "defusedxml universal-pathlib dask psutil requests shapely")


@contextlib.contextmanager
def _quiet():
    """tiatoolbox logs a WARNING for every missing metadata field; keep them out of our progress output. Its
    ``import`` also leaves a file open (tiatoolbox 2.1.3 ``tiatoolbox/__init__.py`` ``read_registry_files``:
    ``Path.open`` without ``close``), a ``ResourceWarning`` at every first use that is not ours to fix: the
    warning is ignored for that module only."""
    logger = logging.getLogger("tiatoolbox")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=ResourceWarning, message=r"unclosed file .*tiatoolbox")
            yield
    finally:
        logger.setLevel(level)


class TiatoolboxWSI(WSI):
    """An open slide backed by a ``tiatoolbox`` WSIReader."""

    def __init__(self, path: str):
        try:
            with _quiet():
                from tiatoolbox.wsicore.wsireader import WSIReader
        except ImportError as err:
            raise SlideOpenError(path, f"tiatoolbox is not installed or incomplete ({err}); {INSTALL_HINT}") from None
        self.path, self.reader = str(path), "tiatoolbox"
        try:
            with _quiet():
                self._wsi = WSIReader.open(self.path)
                info = self._wsi.info
        except ImportError as err:
            raise SlideOpenError(path, f"tiatoolbox needs an extra package for this format ({err})") from None
        except Exception as err:  # tiatoolbox raises library-specific errors; keep the cause in the message
            raise SlideOpenError(path, f"tiatoolbox cannot open it: {type(err).__name__}: {err}") from None
        self._dims = [(int(w), int(h)) for w, h in info.level_dimensions]
        self._downsamples = [float(d) for d in info.level_downsamples]
        self._mpp = None if info.mpp is None else (float(info.mpp[0]), float(info.mpp[1]))
        self._vendor = str(info.vendor)
        self._backend = type(self._wsi).__name__

    @property
    def level_dimensions(self):
        return list(self._dims)

    @property
    def level_downsamples(self):
        return list(self._downsamples)

    @property
    def mpp(self):
        mpp = self._mpp
        return mpp if mpp and all(np.isfinite(m) and m > 0 for m in mpp) else None

    @property
    def properties(self):
        return {"tiatoolbox.reader": self._backend, "tiatoolbox.vendor": self._vendor}

    def read_region(self, location, level, size):
        x, y = int(location[0]), int(location[1])
        level = check_level(level, len(self._dims))
        try:
            with _quiet():
                arr = self._wsi.read_rect((x, y), (int(size[0]), int(size[1])), resolution=int(level), units="level",
                                          pad_mode="constant", pad_constant_values=255, coord_space="baseline")
        except Exception as err:
            raise SlideReadError(self.path, f"cannot decode the region at level-0 ({x}, {y}), level {level}: "
                                            f"{type(err).__name__}: {err}") from None
        return to_rgb_uint8(np.asarray(arr, dtype=np.uint8))

    def thumbnail(self, max_size: int) -> np.ndarray:
        size = thumbnail_size(self._dims[0], max_size)
        level = thumbnail_level(self._dims, size)
        ds = self._downsamples[level]
        return blockwise_thumbnail(lambda x, y, w, h: self.read_region((round(x * ds), round(y * ds)), level, (w, h)),
                                   self._dims[level], size)

    def close(self):
        handle = getattr(self._wsi, "openslide_wsi", None) or getattr(self._wsi, "tiff", None)
        if handle is not None and hasattr(handle, "close"):
            handle.close()
        store = getattr(self._wsi, "_zarr_store", None)  # TIFFWSIReader: tifffile's zarr store has its own file
        if store is not None and hasattr(store, "close"):  # handles (tiatoolbox wsireader/base.py, aszarr=True)
            store.close()


class TiatoolboxReader(SlideReader):
    """TIAToolbox WSIReader (optional extra; OpenSlide, OME-TIFF, JP2, NGFF, DICOM with wsidicom)."""

    name = "tiatoolbox"

    def unavailable_reason(self) -> str | None:
        try:
            with _quiet():
                from tiatoolbox.wsicore.wsireader import WSIReader  # noqa: F401
        except ImportError as err:
            return f"tiatoolbox is not installed or incomplete ({err}); {INSTALL_HINT}"
        return None

    def open(self, path: str) -> WSI:
        return TiatoolboxWSI(path)


@hookimpl
def gigapath_slide_readers():
    return [TiatoolboxReader]
