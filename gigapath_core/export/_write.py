"""Shared pieces of the exporters: an atomic HDF5 writer with per-dataset attributes, and encoder names.

Exported files follow the other tool's layout, not ours, so they carry no ``format_version`` attribute (that
attribute promises our coordinate contract, and e.g. the prov-gigapath export's ``coords`` are grid px). They
carry ``exported_by`` (``gigapath-core <version>``) and ``export_format`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import units
from ..store import _attr, atomic_path
from ._source import SlideFeatures


def write_h5(path: Path, datasets: dict[str, np.ndarray], dataset_attrs: dict[str, dict[str, Any]] | None = None,
             root_attrs: dict[str, Any] | None = None) -> Path:
    """Write ``datasets`` with attributes on each dataset and on the root, atomically (store.atomic_path).

    ``None`` attribute values are stored as "none", dicts/lists as JSON (store._attr).
    """
    import h5py

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, arr in datasets.items():
                ds = f.create_dataset(name, data=np.asarray(arr))
                for k, v in (dataset_attrs or {}).get(name, {}).items():
                    ds.attrs[k] = _attr(v)
            for k, v in (root_attrs or {}).items():
                f.attrs[k] = _attr(v)
    return Path(path)


def provenance(sf: SlideFeatures, fmt: str) -> dict[str, Any]:
    """Root attributes every exported h5 carries: where it came from (never read by the other tools)."""
    from .. import __version__

    return {"exported_by": f"gigapath-core {__version__}", "export_format": fmt, "slide_id": sf.slide_id,
            "tile_encoder": sf.tile_encoder, "weights_source": sf.weights_source}


#: our (recorded tile_encoder name: plugin or preset, weights source substring) -> the name TRIDENT's
#: ``enc_name`` and STAMP's ``ExtractorName`` use (trident/patch_encoder_models/load.py;
#: stamp/preprocessing/config.py), so that their slide encoders accept the features (TRIDENT looks for
#: ``features_gigapath/``, STAMP checks ``extractor``).
_ECOSYSTEM_NAMES = [("dinov2_vit", "prov-gigapath", "gigapath"), ("prov-gigapath", "prov-gigapath", "gigapath"),
                    ("ctranspath", "", "ctranspath")]


def encoder_name(sf: SlideFeatures, override: str | None = None) -> str:
    """Tile-encoder name for folder names and ``extractor``/``encoder`` attributes.

    ``override`` wins; else the ecosystem's name of a known model (the Prov-GigaPath tile encoder with its
    released weights, as plugin ``dinov2_vit`` or preset ``prov-gigapath`` -> ``gigapath``); else the name the
    run recorded for its tile encoder (root attribute ``tile_encoder`` of ``tile_embeddings.h5`` = the config's
    ``tile_encoder.name``: the preset name when the run used a preset, ``dinov2-vits14``, else the plugin name,
    ``dinov2_vit``); else ``extractor``/``encoder`` of the feature file an embed run on existing features read;
    else ``unknown``.
    """
    if override:
        return override
    for plugin, weights, name in _ECOSYSTEM_NAMES:
        if sf.tile_encoder == plugin and weights in sf.weights_source.lower():
            return name
    return sf.tile_encoder or "unknown"


def level0_patch_size(sf: SlideFeatures) -> int:
    """Tile side in level-0 px as one integer such that ``floor(coords / size)`` gives each tile's grid cell
    (:func:`gigapath_core.units.patch_size_level0`)."""
    return units.patch_size_level0(sf.tile_size_level0)


def slide_encoder_name(sf: SlideFeatures, tile_encoder: str) -> str:
    """Slide-encoder name for TRIDENT's ``slide_features_<name>/`` folder (trident/slide_encoder_models/load.py).

    LongNet with the Prov-GigaPath weights -> ``gigapath``; mean pooling -> ``mean-<tile encoder>`` (TRIDENT's
    ``mean-<patch encoder>`` naming, trident/Processor.py ``run_slide_feature_extraction_job``); else our name.
    """
    if sf.slide_encoder == "longnet" and "prov-gigapath" in sf.slide_encoder_weights.lower():
        return "gigapath"
    if sf.slide_encoder == "mean":
        return f"mean-{tile_encoder}"
    return sf.slide_encoder or "unknown"
