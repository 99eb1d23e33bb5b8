"""STAMP layout (KatherLab/STAMP): a ``feature_dir`` of ``<slide>.h5`` files and a slide table.

::

    DEST/<slide>.h5          feats (N, D) float32; coords (N, 2) float64 µm (top-left corner, x, y)
    DEST/slide_table.csv     PATIENT,FILENAME (PATIENT = slide_id until you put patient ids there)

As STAMP writes and reads them:

- root attributes written by src/stamp/preprocessing/__init__.py ``extract_``: ``extractor``, ``unit`` = "um",
  ``tile_size_um``, ``tile_size_px``, ``code_hash``, ``feat_type`` = "tile" (we write no ``stamp_version``:
  src/stamp/modeling/data.py ``get_coords`` refuses files from a *newer* STAMP than the one installed);
- readers: src/stamp/modeling/data.py ``BagDataset.__getitem__`` (``feats``), ``get_coords`` (``coords`` in µm
  when ``tile_size_um`` is set; slide mpp = ``tile_size_um / tile_size_px``), ``detect_feature_type``
  (``feat_type``); src/stamp/encoding/encoder/__init__.py checks ``extractor`` against the slide encoder's
  required extractor (``gigapath`` for STAMP's Prov-GigaPath encoder, which takes ``coords_um / mpp`` and
  floors by 256: src/stamp/encoding/encoder/gigapath.py);
- slide table: ``PATIENT``/``FILENAME`` (src/stamp/modeling/config.py ``filename_label``; data.py
  ``slide_to_patient_from_slide_table_`` wants names ending in ``.h5``).

Coordinates are the tile's corner on the target grid in µm, ``grid_coords * target_mpp`` (multiples of
``tile_size_um`` = 128 µm), as STAMP's own tiler writes them. They equal ``level-0 px * level-0 mpp`` to within
half a level-0 px (our level-0 coords are rounded to whole px), and unlike those they map to the right cell under
STAMP's ``floor(coords_um / mpp / 256)`` (cell 2 of a 0.2271 µm/px scan: 1127 px x 0.2271 µm/px = 255.9 µm
= 511.9 px at 0.5 µm/px, which would land in cell 1).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..store import write_bytes
from ._source import SlideFeatures
from ._write import encoder_name, provenance, write_h5

FORMAT = "stamp"
CODE_HASH = "gigapath"  # STAMP's hash of its preprocessing code; ours is not STAMP's code, so a fixed marker


def coords_um(sf: SlideFeatures) -> np.ndarray:
    """(N, 2) float64 µm of each tile's top-left corner: ``grid_coords * target_mpp``."""
    return sf.grid_coords.astype(np.float64) * float(sf.target_mpp)


def export_slide(sf: SlideFeatures, dest: Path, *, encoder: str | None = None) -> list[Path]:
    """Write ``DEST/<slide>.h5`` for STAMP; return the files written."""
    root = {**provenance(sf, FORMAT),
            "extractor": encoder_name(sf, encoder), "unit": "um",
            "tile_size_um": float(sf.tile_size * sf.target_mpp), "tile_size_px": int(sf.tile_size),
            "code_hash": CODE_HASH, "feat_type": "tile"}
    if sf.level0_mpp is not None:
        root["level0_mpp"] = float(sf.level0_mpp[0])
    path = write_h5(Path(dest) / f"{sf.slide_id}.h5",
                    {"feats": sf.features.astype(np.float32), "coords": coords_um(sf)},
                    {"coords": {"unit": "um", "target_mpp": float(sf.target_mpp)}}, root)
    return [path]


def finish(slide_ids: list[str], dest: Path) -> list[Path]:
    """Write ``DEST/slide_table.csv`` (PATIENT, FILENAME) for the exported slides."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["PATIENT", "FILENAME"])
    w.writerows([sid, f"{sid}.h5"] for sid in slide_ids)
    path = Path(dest) / "slide_table.csv"
    write_bytes(path, buf.getvalue().encode())
    return [path]
