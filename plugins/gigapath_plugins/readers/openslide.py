"""OpenSlide reader: Aperio SVS, Hamamatsu NDPI, MIRAX, Philips/generic tiled TIFF, DICOM WSI, ...

Uses openslide-python with the openslide-bin wheel (no system library needed).
"""

from __future__ import annotations

import numpy as np

from gigapath_core import hookimpl
from gigapath_core.errors import SlideOpenError, SlideReadError
from gigapath_core.kinds import WSI, SlideReader


class OpenSlideWSI(WSI):
    def __init__(self, path: str):
        import openslide

        self.path, self.reader = str(path), "openslide"
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideOpenError(path, "not a slide format OpenSlide supports") from None
        except openslide.OpenSlideError as err:
            raise SlideOpenError(path, f"OpenSlide cannot open it: {err}") from None

    @property
    def level_dimensions(self):
        return [tuple(map(int, d)) for d in self._slide.level_dimensions]

    @property
    def level_downsamples(self):
        return [float(d) for d in self._slide.level_downsamples]

    @property
    def mpp(self):
        props = self._slide.properties
        try:
            x, y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None
        return (x, y) if x > 0 and y > 0 else None

    @property
    def properties(self):
        return dict(self._slide.properties)

    def read_region(self, location, level, size):
        import openslide

        try:
            rgba = np.asarray(self._slide.read_region(tuple(map(int, location)), int(level), tuple(map(int, size))))
        except openslide.OpenSlideError as err:
            raise SlideReadError(self.path, f"cannot decode region at level-0 {tuple(location)} level {level}: {err}") from None
        rgb = rgba[..., :3].copy()
        # OpenSlide returns transparent (alpha 0) pixels outside the scanned area: make them white
        rgb[rgba[..., 3] == 0] = 255
        return rgb

    def close(self):
        self._slide.close()


class OpenSlideReader(SlideReader):
    """OpenSlide (SVS, NDPI, MRXS, Philips/generic TIFF, DICOM WSI...)."""

    name = "openslide"

    def open(self, path: str) -> WSI:
        return OpenSlideWSI(path)


@hookimpl
def gigapath_slide_readers():
    return [OpenSlideReader]
