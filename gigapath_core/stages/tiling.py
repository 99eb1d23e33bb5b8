"""Tiling stage: open the slide with the first reader that can, lay the tile grid, write the QC outputs.

Outputs in the slide folder (see :mod:`gigapath_core.store`):

- ``tiles.h5`` (format_version 2, ``docs/formats.md``): ``coords`` (N, 2) int64 level-0 px top-left corners
  (with the TRIDENT/CLAM attributes of :mod:`gigapath_core.interop.contract`), ``grid_coords`` (N, 2) int64 px
  at ``target_mpp`` (multiples of ``tile_size``: what the slide encoder takes, Xu et al. 2024, Methods: Preprocessing
  WSIs), ``occupancy`` (N,)
  float32; attributes record the reader, source mpp (and whether it was an override), level, read size, the
  tiler's facts (Otsu threshold, tissue fraction, grid size).
- ``thumbnail.png``: the mask thumbnail with the tissue outline (green), the annotation mask's region (orange)
  and excluded annotations (magenta) when one is used, the kept tiles (blue boxes) and the rejected ones (red),
  with a legend and a µm scale bar (:mod:`gigapath_core.stages.qc`).
- ``tissue.geojson``: tissue polygons (with holes) in level-0 px, a FeatureCollection that QuPath imports
  (drag it onto the open slide) as "Tissue" annotations.

The two QC outputs are written by a background thread (:func:`start_tiling`) while ``tiles.h5`` is written and
the next stage runs; the pipeline joins it before the slide's marker, so a QC write error still fails the
slide, and a ``tiles.h5`` counts as done only next to both QC outputs (:func:`qc_outputs_present`).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import SlideError, SlideOpenError
from ..kinds import WSI, Tiler, TileGrid
from ..masks import MaskSpec, load_mask
from ..store import write_bytes, write_h5, write_png
from .qc import EXCLUDED_RGB, REGION_RGB, REJECTED_RGB, TILE_RGB, TISSUE_RGB, outline_width  # noqa: F401
from .qc import qc_thumbnail as _qc_thumbnail

TILES_FILE = "tiles.h5"


def open_slide(path: str, readers: list[str]) -> WSI:
    """Open ``path`` with the first reader (in the given order) that can; ``wsi.reader`` names it.

    Raises:
        SlideOpenError: the file is missing, or no reader could open it; the message gives each reader's
            reason (e.g. "openslide: not a slide format OpenSlide recognises; tifffile: not a TIFF file ...").
    """
    from ..api import build

    p = Path(path)
    if not p.exists():
        raise SlideOpenError(path, "file not found")
    if not p.is_file():
        raise SlideOpenError(path, "not a file (a folder? give the slide file itself)")
    if p.stat().st_size == 0:
        raise SlideOpenError(path, "empty file (0 bytes)")
    reasons = []
    for name in readers:
        try:
            return build("slide_reader", name).open(str(path))
        except SlideError as err:
            reason = str(err)
            if reason.startswith(f"{path}: "):
                reason = reason[len(f"{path}: "):]
            reasons.append(f"{name}: {reason.replace(str(path), p.name)}")
        except ImportError as err:
            reasons.append(f"{name}: not installed ({err})")
        except Exception as err:  # a reader bug must not stop the next reader from trying
            reasons.append(f"{name}: unexpected {type(err).__name__}: {err}")
    truncated = _tiff_points_past_end(p)
    if truncated:
        reasons.insert(0, truncated)
    raise SlideOpenError(path, "no reader could open it — " + "; ".join(reasons))


def _tiff_points_past_end(path: Path, max_ifds: int = 4096) -> str | None:
    """``"file truncated? (...)"`` if ``path`` starts like a TIFF (classic or BigTIFF, either byte order) and
    its chain of IFD offsets (TIFF 6.0 §2; BigTIFF: 8-byte offsets) points past the end of the file, else None.
    An Aperio SVS keeps its IFDs after the image data, so a cut copy's first offset is past its end."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 16:
            return None
        magic = struct.unpack(order + "H", head[2:4])[0]
        if magic == 42:
            offset, count_fmt, entry_size, off_fmt = struct.unpack(order + "I", head[4:8])[0], "H", 12, "I"
        elif magic == 43:
            offset, count_fmt, entry_size, off_fmt = struct.unpack(order + "Q", head[8:16])[0], "Q", 20, "Q"
        else:
            return None
        count_size, off_size = struct.calcsize(count_fmt), struct.calcsize(off_fmt)
        for _ in range(max_ifds):
            if offset == 0:
                return None
            if offset + count_size > size:
                return f"file truncated? (the TIFF points past its end: offset {offset:,} > size {size:,})"
            f.seek(offset)
            count = struct.unpack(order + count_fmt, f.read(count_size))[0]
            end = offset + count_size + count * entry_size + off_size
            if end > size:
                return (f"file truncated? (the TIFF points past its end: IFD at {offset:,} ends at {end:,} > "
                        f"size {size:,})")
            f.seek(end - off_size)
            offset = struct.unpack(order + off_fmt, f.read(off_size))[0]
    return None


def _mask_downsample_xy(grid: TileGrid, level0_size: tuple[int, int] | None) -> tuple[float, float]:
    if level0_size is not None:
        return level0_size[0] / grid.tissue_mask.shape[1], level0_size[1] / grid.tissue_mask.shape[0]
    xy = grid.info.get("mask_downsample_xy")
    if xy:
        return float(xy[0]), float(xy[1])
    return grid.mask_downsample, grid.mask_downsample


def tissue_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons of a tissue mask: one per 8-connected component, as [exterior, hole, hole...] rings.

    Each ring is an (M, 2) float array of (x, y) in mask px (pixel (i, j) covers [j, j+1) x [i, i+1)), closed
    (first point == last point), simplified to within 0.5 px.
    """
    import shapely
    from scipy import ndimage
    from skimage import measure

    def rings(binary: np.ndarray, offset: tuple[int, int], connected: str) -> list[np.ndarray]:
        padded = np.pad(binary.astype(np.uint8), 1)
        out = []
        for c in measure.find_contours(padded, 0.5, fully_connected=connected):
            # Douglas-Peucker in GEOS: ~250x faster than skimage's approximate_polygon (which made the GeoJSON
            # 60% of the tiling stage on a 20k x 20k slide, benchmarks/tissue.py); same tolerance, its vertex
            # choices may differ (Hausdorff distance between the two <= 0.5 px). GEOS collapses a ring of a
            # speck of 1-2 px, which skimage keeps: such tiny rings still go through skimage.
            s = shapely.get_coordinates(shapely.simplify(shapely.linestrings(c), 0.5, preserve_topology=False))
            c = s if len(s) >= 4 else measure.approximate_polygon(c, tolerance=0.5)
            if len(c) < 4:
                continue
            xy = np.stack([c[:, 1] - 1 + offset[1] + 0.5, c[:, 0] - 1 + offset[0] + 0.5], axis=1)
            if not np.array_equal(xy[0], xy[-1]):
                xy = np.vstack([xy, xy[:1]])
            out.append(xy)
        return out

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    polygons = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp = labels[sl] == k
        filled = ndimage.binary_fill_holes(comp)
        offset = (sl[0].start, sl[1].start)
        outer = rings(filled, offset, "high")
        if not outer:
            continue
        poly = [max(outer, key=len)]
        holes, _ = ndimage.label(filled & ~comp)
        for j, hsl in enumerate(ndimage.find_objects(holes), start=1):
            if hsl is None:
                continue
            hoff = (offset[0] + hsl[0].start, offset[1] + hsl[1].start)
            poly += rings(holes[hsl] == j, hoff, "low")[:1]
        polygons.append(poly)
    return polygons


def tissue_geojson(grid: TileGrid, level0_size: tuple[int, int] | None = None) -> dict:
    """Tissue polygons of ``grid.tissue_mask`` as a GeoJSON FeatureCollection in **level-0 px** (QuPath).

    Args:
        level0_size: (w, h) of level 0; gives the exact per-axis mask downsample (else taken from the grid).
    """
    dsx, dsy = _mask_downsample_xy(grid, level0_size)
    features = []
    for poly in tissue_polygons(grid.tissue_mask):
        coords = [[[round(float(x) * dsx, 1), round(float(y) * dsy, 1)] for x, y in ring] for ring in poly]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "isLocked": False,
                           "classification": {"name": "Tissue", "color": [0, 200, 0]}},
        })
    return {"type": "FeatureCollection", "features": features}


def qc_thumbnail(grid: TileGrid, level0_size: tuple[int, int] | None = None, annotations=None,
                 legend: bool = True) -> np.ndarray:
    """The QC thumbnail (:mod:`gigapath_core.stages.qc`): tissue outline, annotations, kept and rejected tiles,
    legend and µm scale bar; (h [+ legend], w, 3) uint8."""
    return _qc_thumbnail(grid, _mask_downsample_xy(grid, level0_size), annotations, legend)


#: the tiling stage's QC outputs, written off the critical path (:func:`start_tiling`)
QC_FILES = ("thumbnail.png", "tissue.geojson")


class PendingQC:
    """The QC outputs (``thumbnail.png``, ``tissue.geojson``) of one slide being written by a background thread.

    :meth:`wait` joins it and re-raises its error. A failed QC write also removes the ``tiles.h5`` that was
    written next to it, so the slide's tiling (and its QC outputs) is redone by the next run, as when the QC
    outputs were written before ``tiles.h5``.
    """

    def __init__(self, slide_dir: Path, write: Callable[[], None]):
        self.slide_dir = Path(slide_dir)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"gigapath-qc-{self.slide_dir.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as err:  # handed to wait(), in the caller's thread
            self._error = err

    def wait(self) -> None:
        """Block until the QC outputs are written. Raises whatever writing them raised (e.g. OSError), after
        removing ``tiles.h5`` (best effort)."""
        self._thread.join()
        if self._error is not None:
            (self.slide_dir / TILES_FILE).unlink(missing_ok=True)
            raise self._error


def start_tiling(tiler: Tiler, wsi: WSI, slide_dir: Path, mpp: tuple[float, float] | None, attrs: dict,
                 mask: MaskSpec | None = None) -> tuple[TileGrid, PendingQC]:
    """Tile ``wsi``, write ``tiles.h5`` into ``slide_dir`` and start writing ``thumbnail.png`` and
    ``tissue.geojson`` in a background thread; :func:`run_tiling` with the QC outputs off the critical path.

    The QC thread starts once the grid is known and runs while ``tiles.h5`` is written and the next stage
    starts; the caller must :meth:`PendingQC.wait` before the slide's marker is written (its error then fails
    the slide as a synchronous write would). QC outputs of an earlier tiling are removed first, so a
    ``tiles.h5`` of this tiling never stands next to them (:func:`qc_outputs_present` needs both).

    Args, Raises: as :func:`run_tiling` (the QC outputs' errors come from :meth:`PendingQC.wait`).
    """
    level0 = tuple(wsi.level_dimensions[0])
    annotations = load_mask(mask, wsi.path, level0) if mask is not None else None
    grid = tiler.tile(wsi, mpp, annotations) if annotations is not None else tiler.tile(wsi, mpp)
    attrs = {**attrs, **(annotations.attrs() if annotations is not None else {"mask_path": "", "mask_mode": "none"})}
    for name in QC_FILES:
        (slide_dir / name).unlink(missing_ok=True)

    def write_qc() -> None:
        # zlib level 1: half the time of the default, same pixels (benchmarks/tissue.py)
        write_png(slide_dir / "thumbnail.png", qc_thumbnail(grid, level0, annotations), compress_level=1)
        write_bytes(slide_dir / "tissue.geojson", json.dumps(tissue_geojson(grid, level0)).encode())

    pending = PendingQC(slide_dir, write_qc)
    try:
        write_tiles(slide_dir, grid, wsi, mpp, attrs, tiler.name)
    except Exception:
        pending.wait()  # no writer left behind; a QC error is reported first, as when QC was written first
        raise
    return grid, pending


def run_tiling(tiler: Tiler, wsi: WSI, slide_dir: Path, mpp: tuple[float, float] | None, attrs: dict,
               mask: MaskSpec | None = None) -> TileGrid:
    """Tile ``wsi`` and write ``tiles.h5``, ``thumbnail.png`` and ``tissue.geojson`` into ``slide_dir``; returns
    once all three are written (:func:`start_tiling` returns after ``tiles.h5``).

    Args:
        mpp: per-slide level-0 mpp override (config ``inputs.mpp`` / CSV ``slide_mpp``), or None.
        mask: the slide's QuPath GeoJSON annotation mask (``inputs.masks`` / CSV ``mask``), or None; recorded in
            the tiles.h5 attrs ``mask_path``, ``mask_sha256``, ``mask_mode``... (``mask_path`` "" when none).
    Raises:
        MissingMppError, ImplausibleMppError, PixelBudgetError, SlideReadError: from the tiler; MaskError: the
        mask is unusable (each fails the slide, the batch goes on); OSError: an output cannot be written
        (``tiles.h5`` is then absent).
    """
    grid, pending = start_tiling(tiler, wsi, slide_dir, mpp, attrs, mask)
    pending.wait()
    return grid


def qc_outputs_present(slide_dir: Path) -> bool:
    """Both QC outputs are in ``slide_dir``: a ``tiles.h5`` counts as done only next to them (a run killed
    while the QC thread was writing left a ``tiles.h5`` without them)."""
    return all((Path(slide_dir) / name).is_file() for name in QC_FILES)


def write_tiles(slide_dir: Path, grid: TileGrid, wsi: WSI, mpp: tuple[float, float] | None, attrs: dict,
                tiler_name: str) -> None:
    """Write ``tiles.h5`` (format_version 2, see the module docstring) for ``grid``."""
    write_h5(
        slide_dir / TILES_FILE,
        {
            "coords": grid.coords.astype(np.int64).reshape(-1, 2),
            "grid_coords": grid.grid_coords.astype(np.int64).reshape(-1, 2),
            "occupancy": grid.occupancy.astype(np.float32),
        },
        attrs={
            **attrs,
            "reader": wsi.reader,
            "tiler": tiler_name,
            "source_mpp_x": float(grid.source_mpp[0]),
            "source_mpp_y": float(grid.source_mpp[1]),
            "mpp_source": "override" if mpp is not None else "metadata",
            "target_mpp": float(grid.target_mpp),
            "tile_size": int(grid.tile_size),
            "level": int(grid.level),
            "read_size": int(grid.read_size),
            "level_dimensions": [list(d) for d in wsi.level_dimensions],
            "level_downsamples": [float(d) for d in wsi.level_downsamples],
            "coords_unit": "level-0 px (top-left corner)",
            "grid_coords_unit": f"px at {float(grid.target_mpp)} um/px (multiples of {int(grid.tile_size)})",
            "tiler_info": grid.info,
            "gigapath_version": __version__,
        },
        dataset_attrs=tile_coords_attrs(grid, attrs.get("slide_id", ""),
                                        [float(d) for d in wsi.level_downsamples]),
    )


def tile_coords_attrs(grid: TileGrid, name: str, level_downsamples: list[float]) -> dict[str, dict]:
    """``{"coords": ..., "grid_coords": ...}`` dataset attributes of the coordinate contract
    (:func:`gigapath_core.interop.coords_attrs`) for a tile grid."""
    from ..interop import coords_attrs, grid_coords_attrs

    level = int(grid.level)
    ds = level_downsamples[level] if level < len(level_downsamples) else 1.0
    return {"coords": coords_attrs(float(grid.source_mpp[0]), target_mpp=float(grid.target_mpp),
                                   tile_size=int(grid.tile_size), name=name, patch_level=level, downsample=ds),
            "grid_coords": {**grid_coords_attrs(target_mpp=float(grid.target_mpp), tile_size=int(grid.tile_size)),
                            # overlapping tiles (tiler stride): grid_coords are multiples of the stride
                            **({"stride": int(grid.info["stride"])}
                               if int(grid.info.get("stride", grid.tile_size)) != int(grid.tile_size) else {})}}
