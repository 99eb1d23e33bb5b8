"""CLAM layout (mahmoodlab/CLAM): the feature folder CLAM's training and heatmap scripts read.

::

    DEST/patches/<slide>.h5    coords (N, 2) int64 level-0 px (create_patches_fp.py output)
    DEST/h5_files/<slide>.h5   features (N, D) float32; coords (N, 2) int64 level-0 px
    DEST/pt_files/<slide>.pt   features as a plain float32 tensor (N, D) (torch.save; loads with weights_only=True)

As CLAM writes and reads them:

- ``patches/<slide>.h5``: attributes on ``coords`` from wsi_core/WholeSlideImage.py ``process_contour``:
  ``patch_size`` (side read *at* ``patch_level``), ``patch_level``, ``downsample``, ``downsampled_level_dim``,
  ``level_dim``, ``name``, ``save_path``; dataset_modules/dataset_h5.py ``Whole_Slide_Bag_FP`` reads a tile as
  ``wsi.read_region(coord, patch_level, (patch_size, patch_size))``, so ``coords`` are level-0 px and
  ``patch_size`` is our ``read_size`` at our ``level`` (564 px at level 0 of a 0.2271 µm/px scan);
- ``h5_files``/``pt_files``: extract_features_fp.py (``save_hdf5`` of ``features``/``coords``; ``torch.save`` of
  the feature tensor); dataset_modules/dataset_generic.py ``Generic_MIL_Dataset.__getitem__`` loads
  ``<data_dir>/pt_files/<slide_id>.pt`` or ``<data_dir>/h5_files/<slide_id>.h5`` (``features``, ``coords``).

The ``h5_files`` coords carry the same CLAM attributes plus ours (``level0_mpp``, ``target_mpp``, ``tile_size`` =
the grid cell side in px at ``target_mpp``, ``tile_size_level0``, ``unit``): CLAM records no grid, so our reader
(:func:`gigapath_core.interop.read_tile_features`) takes the run's tile size from them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..store import atomic_path
from ._source import SlideFeatures
from ._write import level0_patch_size, provenance, write_h5

FORMAT = "clam"


def coords_attrs(sf: SlideFeatures, save_path: str) -> dict:
    """CLAM's attributes on ``coords`` (size at ``patch_level``) plus ours."""
    level, size = sf.level, sf.read_size
    if size is None:  # foreign features: no read geometry recorded; read the tile's level-0 square
        level, size = 0, int(round(sf.tile_size_level0))
    attrs = {"patch_size": int(size), "patch_level": int(level), "name": sf.slide_id, "save_path": save_path}
    dims = sf.level_dimensions
    if dims and level < len(dims):
        w0, h0 = dims[0]
        wl, hl = dims[level]
        attrs.update(downsample=(w0 / wl, h0 / hl), downsampled_level_dim=(int(wl), int(hl)),
                     level_dim=(int(wl), int(hl)))
    attrs.update(level0_mpp=float(sf.need_mpp()[0]), target_mpp=float(sf.target_mpp), tile_size=int(sf.tile_size),
                 patch_size_level0=level0_patch_size(sf), tile_size_level0=float(sf.tile_size_level0),
                 unit="level-0 px")
    return attrs


def export_slide(sf: SlideFeatures, dest: Path, *, encoder: str | None = None) -> list[Path]:
    """Write ``sf`` into the CLAM feature folder ``dest``; return the files written.

    Raises:
        SlideError: the slide has no level-0 coords or no level-0 mpp.
    """
    import torch

    coords = sf.need_coords()
    dest = Path(dest)
    root = provenance(sf, FORMAT)
    patches = write_h5(dest / "patches" / f"{sf.slide_id}.h5", {"coords": coords},
                       {"coords": coords_attrs(sf, str(dest / "patches"))}, root)
    h5 = write_h5(dest / "h5_files" / f"{sf.slide_id}.h5",
                  {"features": sf.features.astype(np.float32), "coords": coords},
                  {"coords": coords_attrs(sf, str(dest / "patches"))}, root)
    pt = dest / "pt_files" / f"{sf.slide_id}.pt"
    with atomic_path(pt) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(sf.features, dtype=np.float32)).clone(), tmp)
    return [h5, pt, patches]
