"""Official prov-gigapath fine-tuning layout (prov-gigapath/prov-gigapath): the ``--root_path`` folder.

::

    DEST/<slide>.h5    features (N, D) float32; coords (N, 2) int64 grid px at 0.5 µm/px (multiples of 256)

As their code reads it: finetune/datasets/slide_datatset.py ``SlideDataset.get_one_sample`` opens
``os.path.join(root_path, slide_id.replace(".svs", "") + ".h5")`` and ``get_images_from_path`` takes the
``features`` and ``coords`` datasets as they are. The slide encoder maps coords to positions with
``floor(coords / tile_size)``, tile_size 256 (gigapath/slide_encoder.py ``coords_to_pos``), and
gigapath/pipeline.py builds coords from tiles cut at 0.5 µm/px, so ``coords`` must be grid px at 0.5 µm/px, not
level-0 px (prov-gigapath issue #116): on a 0.2271 µm/px scan they differ by a factor 2.2.

Note the name clash: in this layout ``coords`` are grid px, which in our own files are called ``grid_coords``.
The ``coords`` dataset says so in its ``unit`` attribute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._source import SlideFeatures
from ._write import provenance, write_h5

FORMAT = "prov-gigapath"


def export_slide(sf: SlideFeatures, dest: Path, *, encoder: str | None = None) -> list[Path]:
    """Write ``DEST/<slide>.h5`` for the official fine-tuning code; return the files written."""
    root = provenance(sf, FORMAT)
    if sf.level0_mpp is not None:
        root["level0_mpp"] = float(sf.level0_mpp[0])
    cattrs = {"unit": f"grid px at {float(sf.target_mpp)} um/px", "target_mpp": float(sf.target_mpp),
              "tile_size": int(sf.tile_size)}
    path = write_h5(Path(dest) / f"{sf.slide_id}.h5",
                    {"features": sf.features.astype(np.float32), "coords": sf.grid_coords.astype(np.int64)},
                    {"coords": cattrs}, root)
    return [path]
