"""The coordinate contract (format version 2, issue #17): names, units and the attributes on ``coords``.

In every h5 file gigapath writes:

- ``coords``: (N, 2) int64 **level-0 px** of each tile's top-left corner, (x, y) columns;
- ``grid_coords``: (N, 2) int64 px at ``target_mpp`` (0.5 µm/px), multiples of ``tile_size`` (256): the
  positions the LongNet slide encoder takes (Xu et al. 2024, Methods: Preprocessing WSIs; slide encoder (LongNet));
- root attribute ``format_version`` = 2. Version 1 (no ``format_version``) named the grid px ``coords`` and
  the level-0 px ``coords_level0`` in ``tile_embeddings.h5``; :func:`gigapath_core.interop.read_tile_features`
  converts it on read.

The attributes on ``coords`` are the ones other tools' readers look for, so a file of ours can be handed to
them unchanged:

- TRIDENT (mahmoodlab/TRIDENT ``trident/IO.py`` ``coords_to_h5`` writes them, ``trident/wsi_objects/WSI.py``
  reads ``patch_size``, ``level0_magnification``, ``target_magnification``, ``overlap`` and builds a
  ``WSIPatcher`` with ``src_pixel_size = 10 / level0_magnification``; its slide encoders read
  ``patch_size_level0``): ``patch_size`` is the tile side **at the target magnification** (256),
  ``patch_size_level0`` its side in level-0 px, magnifications follow ``10 / mpp``
  (:func:`gigapath_core.units.mpp_to_magnification`; not rounded, so 0.2271 µm/px is 44.03x and TRIDENT reads
  564-px regions, the tile our tiler read).
- CLAM (mahmoodlab/CLAM ``wsi_core/WholeSlideImage.py`` writes ``patch_size``, ``patch_level``,
  ``downsample``; ``dataset_modules/dataset_h5.py`` ``Whole_Slide_Bag_FP`` reads ``patch_size`` px at pyramid
  level ``patch_level``). CLAM's ``patch_size`` is the side **at patch_level**; one attribute cannot hold both
  meanings, so we favour TRIDENT (TRIDENT uses its own attributes whenever they are present, and only falls
  back to ``patch_level`` when they are not). ``patch_level`` is the pyramid level our tiler read from; CLAM's
  reader gets the right region when ``read_size == tile_size`` (a pyramid level at the target mpp), not on a
  0.25 µm/px slide read at level 0 (it would read the top-left quarter). ``gigapath export --format clam``
  writes CLAM's meaning.
- ours: ``unit`` ("level-0 px"), ``level0_mpp``, ``target_mpp``, ``tile_size``.
"""

from __future__ import annotations

from typing import Any

from .. import units

FORMAT_VERSION = 2
LEVEL0_UNIT = "level-0 px"
GRID_UNIT = "grid px"
#: values of the ``coords_unit`` option / config key: what a foreign file's ``coords`` are in
COORDS_UNITS = ("level0_px", "grid_px", "um")


def coords_attrs(level0_mpp: float, *, target_mpp: float = units.TARGET_MPP, tile_size: int = units.TILE_SIZE,
                 name: str = "", patch_level: int = 0, downsample: float | None = None) -> dict[str, Any]:
    """Attributes of a ``coords`` dataset ((N, 2) int64 level-0 px top-left, (x, y)).

    Args:
        level0_mpp: µm/px of level 0 (x; the tiler's ``source_mpp[0]``).
        target_mpp, tile_size: the tile grid (256 px at 0.5 µm/px).
        name: the slide id (TRIDENT's ``name``).
        patch_level: the pyramid level the tiler read from (CLAM's ``patch_level``).
        downsample: that level's downsample (CLAM's ``downsample``); default 1.
    """
    side0 = units.tile_size_level0(tile_size, target_mpp, level0_mpp)
    ds = float(downsample) if downsample else 1.0
    return {
        "unit": LEVEL0_UNIT,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
        "tile_size": int(tile_size),
        # TRIDENT (trident/IO.py coords_to_h5)
        "patch_size": int(tile_size),
        "patch_size_level0": units.patch_size_level0(side0),  # floor: TRIDENT's floor(coords / size) = cell
        "tile_size_level0": float(side0),  # the exact side (ours)
        "level0_magnification": units.mpp_to_magnification(level0_mpp),
        "target_magnification": units.mpp_to_magnification(target_mpp),
        "overlap": 0,
        "name": str(name),
        # CLAM (wsi_core/WholeSlideImage.py process_contour); patch_size is shared with TRIDENT, see module doc
        "patch_level": int(patch_level),
        "downsample": (ds, ds),
    }


def grid_coords_attrs(*, target_mpp: float = units.TARGET_MPP, tile_size: int = units.TILE_SIZE) -> dict[str, Any]:
    """Attributes of a ``grid_coords`` dataset ((N, 2) int64 px at ``target_mpp``, multiples of ``tile_size``)."""
    return {"unit": GRID_UNIT, "target_mpp": float(target_mpp), "tile_size": int(tile_size)}
