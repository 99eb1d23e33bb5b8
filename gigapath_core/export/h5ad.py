"""AnnData layout (scverse anndata): tiles as observations, one ``<slide>.h5ad`` per slide or one for the cohort.

::

    DEST/<slide>.h5ad   (per slide)   or   DEST/cohort.h5ad   (--cohort)

- ``X``: (N, D) float32 tile embeddings; ``var_names`` ``f0 … f{D-1}``; ``obs_names`` ``<slide_id>:<row>``.
- ``obs``: ``slide_id`` (categorical), ``x``/``y`` int64 level-0 px of the tile's top-left corner,
  ``x_um``/``y_um`` float64 µm (level-0 px x level-0 mpp), ``grid_x``/``grid_y`` int64 grid px at ``target_mpp``.
- ``obsm['spatial']``: (N, 2) int64 level-0 px (x, y), where squidpy looks for coordinates
  (squidpy's ``Key.obsm.spatial``; spatial plots take ``library_key='slide_id'`` in a cohort file).
- ``uns['slides'][<slide_id>]``: level-0 mpp (x, y), target mpp, tile size (grid px and level-0 px), tile
  encoder, weights, slide path, number of tiles; ``uns['obs_units']`` names the unit of each obs column.

Needs the optional ``anndata`` package: ``pip install 'gigapath-core[anndata]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..store import atomic_path
from ._source import SlideFeatures
from ._write import provenance

FORMAT = "anndata"
COHORT_FILE = "cohort.h5ad"
OBS_UNITS = {"x": "level-0 px", "y": "level-0 px", "x_um": "um", "y_um": "um",
             "grid_x": "grid px at target_mpp", "grid_y": "grid px at target_mpp"}


def import_anndata():
    """Import anndata, or raise ConfigError saying how to install it."""
    try:
        import anndata
    except ImportError:
        raise ConfigError("export.format", "--format anndata needs the anndata package, which is not installed: "
                                           "pip install 'gigapath-core[anndata]'") from None
    return anndata


def slide_meta(sf: SlideFeatures) -> dict[str, Any]:
    """``uns['slides'][slide_id]``: the slide's units and provenance (no None values: h5ad cannot store them)."""
    mpp = sf.need_mpp()
    return {"level0_mpp_x": float(mpp[0]), "level0_mpp_y": float(mpp[1]), "target_mpp": float(sf.target_mpp),
            "tile_size": int(sf.tile_size), "tile_size_level0": float(sf.tile_size_level0),
            "tile_encoder": sf.tile_encoder, "weights_source": sf.weights_source, "slide_path": sf.slide_path,
            "n_tiles": int(len(sf.features)), "embed_dim": int(sf.features.shape[1]) if sf.features.ndim == 2 else 0}


def slide_part(sf: SlideFeatures) -> tuple[np.ndarray, Any, np.ndarray, dict[str, Any]]:
    """(X, obs, spatial, meta) of one slide.

    Raises:
        SlideError: no level-0 coords or no level-0 mpp for this slide.
    """
    import pandas as pd

    coords = sf.need_coords()
    meta = slide_meta(sf)
    n = len(sf.features)
    obs = pd.DataFrame({
        "slide_id": pd.Categorical([sf.slide_id] * n),
        "x": coords[:, 0], "y": coords[:, 1],
        "x_um": coords[:, 0] * meta["level0_mpp_x"], "y_um": coords[:, 1] * meta["level0_mpp_y"],
        "grid_x": sf.grid_coords[:, 0], "grid_y": sf.grid_coords[:, 1],
    }, index=[f"{sf.slide_id}:{i}" for i in range(n)])
    return sf.features.astype(np.float32), obs, coords.astype(np.int64), meta


def _write(parts: list[tuple[SlideFeatures, tuple]], path: Path) -> Path:
    """Write one .h5ad from one or more (slide, slide_part) pairs (at least one)."""
    ad = import_anndata()
    import pandas as pd

    dims = {sf.slide_id: p[0].shape[1] for sf, p in parts}
    if len(set(dims.values())) > 1:
        raise ConfigError("export.cohort", f"slides have different embedding sizes {dims}: one cohort file needs one "
                                           "tile encoder; export without --cohort")
    x = np.concatenate([p[0] for _, p in parts])
    obs = pd.concat([p[1] for _, p in parts])
    obs["slide_id"] = pd.Categorical(obs["slide_id"].astype(str))  # concat of differing categories gives object
    first = parts[0][0]
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"f{i}" for i in range(x.shape[1])]))
    adata.obsm["spatial"] = np.concatenate([p[2] for _, p in parts])
    prov = provenance(first, FORMAT)
    prov.pop("slide_id")
    encoders = sorted({sf.tile_encoder for sf, _ in parts})
    adata.uns.update({**prov, "tile_encoder": ",".join(encoders), "obs_units": dict(OBS_UNITS),
                      "slides": {sf.slide_id: p[3] for sf, p in parts}})
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
    return Path(path)


def export_slide(sf: SlideFeatures, dest: Path, *, encoder: str | None = None) -> list[Path]:
    """Write ``DEST/<slide>.h5ad``; return the files written."""
    import_anndata()
    return [_write([(sf, slide_part(sf))], Path(dest) / f"{sf.slide_id}.h5ad")]


def export_cohort(parts: list[tuple[SlideFeatures, tuple]], dest: Path) -> list[Path]:
    """Write ``DEST/cohort.h5ad`` from the ``(slide, slide_part(slide))`` pairs of every exported slide."""
    if not parts:
        return []
    return [_write(parts, Path(dest) / COHORT_FILE)]
