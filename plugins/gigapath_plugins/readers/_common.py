"""Helpers shared by the slide readers: metadata mpp parsers, bounded-memory thumbnails, white padding.

Nothing here opens files (:func:`file_stamp` only stats one); each reader module owns its library.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from typing import Callable

import numpy as np

from gigapath_core.errors import SlideReadError
from gigapath_core.kinds import thumbnail_level, thumbnail_size  # noqa: F401  (re-exported for the readers)
from gigapath_core.units import length_to_um

#: largest region (level px) a reader decodes at once while building a thumbnail: 16 Mpx ~ 48 MB RGB
THUMBNAIL_BLOCK_PX = 4096


def ome_mpp(ome_xml: str | None, image_index: int = 0) -> tuple[float, float] | None:
    """(mpp_x, mpp_y) in µm/px from OME-XML ``Pixels/@PhysicalSizeX|Y`` (+ ``PhysicalSizeXUnit``, default µm).

    Returns None when the XML, the attributes or a known unit are missing (OME's "reference frame" unit
    means no physical size) or a value is not positive.
    """
    if not ome_xml:
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        return None
    images = root.findall("{*}Image") or root.findall("Image")
    if not images:
        return None
    pixels = images[min(image_index, len(images) - 1)].find("{*}Pixels")
    if pixels is None:
        pixels = images[min(image_index, len(images) - 1)].find("Pixels")
    if pixels is None:
        return None
    try:
        x = length_to_um(float(pixels.attrib["PhysicalSizeX"]), pixels.attrib.get("PhysicalSizeXUnit"))
        y = length_to_um(float(pixels.attrib["PhysicalSizeY"]), pixels.attrib.get("PhysicalSizeYUnit"))
    except (KeyError, ValueError):
        return None
    return (x, y) if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y) else None


_APERIO_MPP = re.compile(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)")


def aperio_mpp(description: str | None) -> tuple[float, float] | None:
    """(mpp, mpp) from an Aperio SVS ImageDescription (``... |MPP = 0.499|...``), or None."""
    if not description or not description.startswith("Aperio"):
        return None
    m = _APERIO_MPP.search(description)
    if not m:
        return None
    try:
        v = float(m.group(1))
    except ValueError:
        return None
    return (v, v) if v > 0 and math.isfinite(v) else None


def blockwise_thumbnail(read_level: Callable[[int, int, int, int], np.ndarray], level_size: tuple[int, int],
                        out_size: tuple[int, int], block_px: int = THUMBNAIL_BLOCK_PX) -> np.ndarray:
    """Downsample a whole level to ``out_size`` by area averaging, decoding at most ``block_px``² px at a time.

    Args:
        read_level: ``(x, y, w, h)`` in level px -> (h, w, 3) uint8 RGB.
        level_size: (w, h) of the level; out_size: (w, h) of the result (not larger than the level).
    Returns:
        (out_h, out_w, 3) uint8. The box filter makes the result independent of the block layout (each
        output pixel is the mean of exactly the level pixels it covers), so memory stays bounded whatever
        the slide size.
    """
    from PIL import Image

    w, h = level_size
    tw, th = out_size
    sx, sy = w / tw, h / th
    kx, ky = max(1, int(block_px // sx)), max(1, int(block_px // sy))  # output px per block
    out = np.empty((th, tw, 3), np.uint8)
    for r0 in range(0, th, ky):
        r1 = min(th, r0 + ky)
        fy0, fy1 = r0 * sy, r1 * sy
        y0, y1 = int(math.floor(fy0)), min(h, int(math.ceil(fy1)))
        for c0 in range(0, tw, kx):
            c1 = min(tw, c0 + kx)
            fx0, fx1 = c0 * sx, c1 * sx
            x0, x1 = int(math.floor(fx0)), min(w, int(math.ceil(fx1)))
            block = read_level(x0, y0, x1 - x0, y1 - y0)
            img = Image.fromarray(block).resize((c1 - c0, r1 - r0), Image.Resampling.BOX,
                                                box=(fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0))
            out[r0:r1, c0:c1] = np.asarray(img)
    return out


def read_padded(read_inside: Callable[[int, int, int, int], np.ndarray], x: int, y: int, w: int, h: int,
                level_size: tuple[int, int]) -> np.ndarray:
    """Read the (x, y, w, h) box of a level (level px) whose parts outside the level are white.

    ``read_inside(x, y, w, h)`` is only called with a box fully inside the level (and not at all when the box
    misses it). Returns (h, w, 3) uint8.
    """
    lw, lh = level_size
    ix0, iy0, ix1, iy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    if ix0 == x and iy0 == y and ix1 == x + w and iy1 == y + h:
        return read_inside(x, y, w, h)
    out = np.full((h, w, 3), 255, np.uint8)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = read_inside(ix0, iy0, ix1 - ix0, iy1 - iy0)
    return out


def check_level(level: int, n_levels: int) -> int:
    """``level`` as int; ValueError (a caller bug, not a slide problem) if the slide has no such level."""
    level = int(level)
    if not 0 <= level < n_levels:
        raise ValueError(f"level {level} does not exist: the slide has {n_levels} level(s)")
    return level


def to_rgb_uint8(arr: np.ndarray) -> np.ndarray:
    """(h, w) or (h, w, 1|2|3|4) uint8 -> (h, w, 3) uint8 RGB; alpha is composited onto white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    if c == 3:
        return arr
    if c in (2, 4):  # gray+alpha / RGBA: composite on white
        color, alpha = arr[..., :-1].astype(np.float32), arr[..., -1:].astype(np.float32) / 255.0
        arr = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        c -= 1
    if c == 1:
        return np.repeat(arr, 3, axis=-1)
    return arr


def file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """(device, inode, size, mtime in ns) of a file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def check_unchanged(path: str, stamp: tuple[int, int, int, int] | None) -> None:
    """SlideReadError when the file at ``path`` is no longer the one ``stamp`` (:func:`file_stamp` at open)
    describes: replaced, truncated, rewritten or deleted while open. OpenSlide opens the path again for some
    reads, so a slide replaced mid-run would otherwise mix pixels of two files."""
    now = file_stamp(path)
    if stamp is None or now == stamp:
        return
    if now is None:
        why = "it was deleted or moved"
    elif now[:2] != stamp[:2]:
        why = "another file was put at its path"
    elif now[2] != stamp[2]:
        why = f"its size changed ({stamp[2]:,} -> {now[2]:,} bytes)"
    else:
        why = "it was modified"
    raise SlideReadError(path, f"the file changed on disk while it was open: {why}")
