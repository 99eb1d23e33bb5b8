"""Which tool wrote a tile-feature file: detection from dataset names, attributes and folder layout.

Layouts (each as that tool's code writes it):

- ``gigapath``: ours. v2 (root ``format_version`` = 2): ``features``, ``coords`` level-0 px, ``grid_coords``.
  v1 (no ``format_version``): ``features``, ``coords`` grid px, ``coords_level0``; ``<slide>/tile_embeddings.h5``.
- ``trident``: mahmoodlab/TRIDENT ``features_<encoder>/<slide>.h5`` (``trident/wsi_objects/WSI.py``
  ``extract_patch_features``): ``features``, ``coords`` level-0 px with ``patch_size``, ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap`` on ``coords`` (``trident/IO.py``).
- ``clam``: mahmoodlab/CLAM ``h5_files/<slide>.h5`` (``extract_features_fp.py``: ``features`` float32,
  ``coords`` int32 level-0 px, **no attributes**) and ``pt_files/<slide>.pt`` (features only). Patch files
  (``create_patches_fp.py``) carry ``patch_size``, ``patch_level``, ``downsample`` on ``coords``.
- ``stamp``: KatherLab/STAMP ``<slide>.h5`` (``src/stamp/preprocessing/__init__.py``): ``feats`` float16,
  ``coords`` float µm, root ``unit`` = "um", ``tile_size_um``, ``tile_size_px``, ``extractor``,
  ``stamp_version`` (read by ``src/stamp/modeling/data.py`` ``get_coords``).
- ``prov-gigapath``: the official fine-tuning input (prov-gigapath ``finetune/datasets/slide_datatset.py``):
  ``features``, ``coords`` = grid px at 0.5 µm/px (prov-gigapath #116), no attributes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FORMATS = ("gigapath", "trident", "clam", "stamp", "prov-gigapath")
TRIDENT_KEYS = ("patch_size_level0", "level0_magnification", "target_magnification")


def decode(v: Any) -> Any:
    """h5 attribute value -> plain Python (bytes -> str, numpy scalar -> item)."""
    if isinstance(v, bytes):
        return v.decode()
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def detect_format(path: Path, names: set[str], root: dict[str, Any], coords_attrs: dict[str, Any]) -> str:
    """One of :data:`FORMATS` for an h5 file with datasets ``names`` and attributes ``root``/``coords_attrs``.

    Our files are recognised by ``grid_coords`` / ``coords_level0``, our provenance attributes or the name
    ``tile_embeddings.h5`` (not by ``format_version`` alone: files exported in another tool's layout carry it
    too); files of ``gigapath export`` by their root ``export_format`` (a prov-gigapath export also carries our
    ``tile_encoder``; a CLAM export TRIDENT's ``patch_size_level0``); TRIDENT by its ``coords`` attributes or a ``features_*`` folder; CLAM by
    ``patch_level`` or an ``h5_files`` folder; STAMP by ``feats``; anything else with ``features`` and
    ``coords`` is read as the official prov-gigapath layout (grid px, checked).
    """
    if "coords_level0" in names or "grid_coords" in names:
        return "gigapath"
    if root.get("export_format") in FORMATS:  # written by ``gigapath export`` (gigapath_core/export/_write.py)
        return str(root["export_format"])
    if "feats" in names:
        return "stamp"
    if any(k in coords_attrs for k in TRIDENT_KEYS):
        return "trident"
    if "patch_level" in coords_attrs or path.parent.name == "h5_files":
        return "clam"
    if path.parent.name.startswith("features_"):
        return "trident"
    if path.name == "tile_embeddings.h5" or "tile_encoder" in root or "gigapath_version" in root:
        return "gigapath"
    return "prov-gigapath"
