"""A tiny finished run for the export tests: two real 0.2271 µm/px slides (level-0 px != grid px) and one
corrupt file, embedded with a one-block ViT (~10 s on 2 CPU cores), plus helpers to rewrite a slide folder's
``tile_embeddings.h5`` in the version-1 or version-2 layout (docs/formats.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

import gigapath_core as gp

ROOT = Path(__file__).resolve().parent.parent
SLIDES = ["OS-1-detail.ome.tif", "OS-2-ndpi.ome.tif"]
TINY_VIT = {"name": "dinov2_vit", "weights": "random", "num_workers": 0, "batch_size": 64,
            "params": {"model_name": "vit_small_patch14_dinov2", "model_kwargs": {"depth": 1}}}


def make_run(base: Path) -> Path:
    """Run the embed job on the two OS slides and a corrupt one; return the run folder."""
    folder = base / "slides"
    folder.mkdir()
    for name in SLIDES:
        shutil.copy(ROOT / "examples" / "data" / name, folder / name)
    (folder / "corrupt.ome.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    out = base / "run"
    cfg = {"inputs": {"slides": [str(folder / "*.tif")]}, "tile_encoder": TINY_VIT,
           "slide_encoder": {"name": "mean", "params": {"in_dim": 384}}}
    assert gp.run(cfg, out=str(out)) == 1  # the corrupt slide failed
    return out


def embeddings(slide_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, level-0 coords, grid coords) of a slide folder, whichever layout version it has."""
    with h5py.File(slide_dir / "tile_embeddings.h5", "r") as f:
        feats = f["features"][()]
        if "coords_level0" in f:  # version 1
            return feats, f["coords_level0"][()], f["coords"][()]
        return feats, f["coords"][()], f["grid_coords"][()]


def rewrite(slide_dir: Path, version: int, *, drop_level0: bool = False) -> None:
    """Rewrite ``tile_embeddings.h5`` in layout ``version`` (1 or 2), keeping its data and root attributes."""
    path = slide_dir / "tile_embeddings.h5"
    feats, level0, grid = embeddings(slide_dir)
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    attrs.pop("format_version", None)
    with h5py.File(path, "w") as f:
        f["features"] = feats
        if version == 1:
            f["coords"] = grid
            if not drop_level0:
                f["coords_level0"] = level0
        else:
            f["coords"] = level0
            f["grid_coords"] = grid
            attrs["format_version"] = 2
        for k, v in attrs.items():
            f.attrs[k] = v
