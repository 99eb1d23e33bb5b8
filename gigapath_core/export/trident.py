"""TRIDENT layout (mahmoodlab/TRIDENT): a job folder TRIDENT's own feature and slide-encoder jobs continue from.

::

    DEST/20x_256px_0px_overlap/patches/<slide>_patches.h5      coords (N, 2) int64 level-0 px
    DEST/20x_256px_0px_overlap/features_<encoder>/<slide>.h5   features (N, D) float32; coords (N, 2) int64 level-0 px
    DEST/20x_256px_0px_overlap/slide_features_<slide encoder>/<slide>.h5   features (D,) float32; coords as above
                                                               (only when the run has a one-vector slide embedding)

Layout and names as TRIDENT writes and reads them:

- folder names: ``{mag}x_{patch_size}px_{overlap}px_overlap`` and ``features_{enc_name}``, ``{name}_patches.h5``
  (trident/Processor.py ``run_patching_job``, ``run_patch_feature_extraction_job``; trident/wsi_objects/WSI.py
  ``extract_tissue_coords``);
- attributes on the ``coords`` dataset (trident/IO.py ``coords_to_h5``): ``patch_size`` (px at the target
  magnification), ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
  ``name``, ``savetodir``, ``level0_width``, ``level0_height``; on ``features``: ``name``, ``savetodir``,
  ``encoder`` (trident/wsi_objects/WSI.py ``extract_patch_features``); slide features as
  ``WSI.extract_slide_features`` writes them (``features`` (D,), ``coords``, attributes ``name``/``savetodir``);
- readers: ``WSI.extract_patch_features`` reads ``patch_size``/``level0_magnification``/``target_magnification``
  and reads a region of ``round(patch_size * level0_mag / target_mag)`` level-0 px (trident/wsi_objects/
  WSIPatcher.py, where ``pixel_size = 10 / mag``); ``WSI.extract_slide_features`` passes the coords attributes to
  the slide encoders, which use ``patch_size_level0`` (trident/slide_encoder_models/load.py).

Magnification = 10 / mpp, written as a float when the scan is not an exact 40×/20× (0.2271 µm/px -> 44.03), so
that TRIDENT reads exactly our 563.6-px region; TRIDENT's own tiler rounds to 40× instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._source import SlideFeatures
from ._write import encoder_name, level0_patch_size, provenance, slide_encoder_name, write_h5

FORMAT = "trident"


def _mag(m: float) -> float | int:
    return int(round(m)) if abs(m - round(m)) < 1e-6 else float(m)


def job_folder_name(sf: SlideFeatures) -> str:
    """``20x_256px_0px_overlap`` (TRIDENT's default ``saveto`` of a patching job)."""
    m = _mag(sf.target_magnification)
    return f"{m if isinstance(m, int) else format(m, 'g')}x_{sf.tile_size}px_0px_overlap"


def coords_attrs(sf: SlideFeatures, savetodir: str) -> dict:
    """Attributes on ``coords`` as trident/IO.py ``coords_to_h5`` writes them, plus ours (units, mpp)."""
    width, height = (sf.level_dimensions[0] if sf.level_dimensions else (None, None))
    return {
        "patch_size": int(sf.tile_size),
        "patch_size_level0": level0_patch_size(sf),
        "level0_magnification": _mag(sf.level0_magnification),
        "target_magnification": _mag(sf.target_magnification),
        "overlap": 0,
        "name": sf.slide_id,
        "savetodir": savetodir,
        "level0_width": width,
        "level0_height": height,
        "level0_mpp": float(sf.need_mpp()[0]),
        "target_mpp": float(sf.target_mpp),
        "tile_size_level0": float(sf.tile_size_level0),
        "unit": "level-0 px",
    }


def export_slide(sf: SlideFeatures, dest: Path, *, encoder: str | None = None) -> list[Path]:
    """Write ``sf`` into the TRIDENT job folder ``dest``; return the files written.

    Raises:
        SlideError: the slide has no level-0 coords or no level-0 mpp.
    """
    coords = sf.need_coords()
    enc = encoder_name(sf, encoder)
    job = Path(dest) / job_folder_name(sf)
    cattrs = coords_attrs(sf, str(job))
    root = provenance(sf, FORMAT)
    patches = write_h5(job / "patches" / f"{sf.slide_id}_patches.h5", {"coords": coords},
                       {"coords": cattrs}, root)
    feats_dir = job / f"features_{enc}"
    feats = write_h5(feats_dir / f"{sf.slide_id}.h5",
                     {"features": sf.features.astype(np.float32), "coords": coords},
                     {"features": {"name": sf.slide_id, "savetodir": str(feats_dir), "encoder": enc},
                      "coords": cattrs}, root)
    written = [feats, patches]
    if sf.slide_embedding is not None and sf.slide_embedding.ndim == 1:  # (L, D) per-layer outputs have no
        slide_dir = job / f"slide_features_{slide_encoder_name(sf, enc)}"  # TRIDENT counterpart: left out
        written.append(write_h5(slide_dir / f"{sf.slide_id}.h5",
                                {"features": sf.slide_embedding.astype(np.float32), "coords": coords},
                                {"features": {"name": sf.slide_id, "savetodir": str(slide_dir)}, "coords": cattrs},
                                {**root, "slide_encoder": sf.slide_encoder,
                                 "slide_encoder_weights": sf.slide_encoder_weights}))
    return written
