"""Real small data for the pretraining tests: tiles of the shipped slides and their tile embeddings from a
tiny ViT (computed once per test session, in memory; :func:`write_embeddings` lays them out as the embed
job does: ``<dir>/<slide_id>/tile_embeddings.h5`` with ``features`` (N, D) and ``coords`` (N, 2) grid px)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SLIDES = {
    "CMU-1-Small-Region": ROOT / "examples" / "data" / "CMU-1-Small-Region.svs",
    "OS-1-detail": ROOT / "examples" / "data" / "OS-1-detail.ome.tif",
    "OS-2-ndpi": ROOT / "examples" / "data" / "OS-2-ndpi.ome.tif",
}
READERS = ["openslide", "tifffile"]
TINY_VIT = {
    "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1.0},
    "img_size": 56,
    "resize": 64,
}
EMBED_DIM = 32


@lru_cache(maxsize=None)
def slide_tiles(slide_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 256, 256, 3) uint8 tiles and (N, 2) int64 grid px coords of one shipped slide (otsu tiler)."""
    from gigapath_core.api import build
    from gigapath_core.stages.tiling import open_slide

    tiler = build("tiler", "otsu")
    with open_slide(str(SLIDES[slide_id]), READERS) as wsi:
        grid = tiler.tile(wsi)
        tiles = np.stack([tiler.read_tile(wsi, c, grid.level, grid.read_size, grid.tile_size) for c in grid.coords])
    return tiles, grid.grid_coords.astype(np.int64)


@lru_cache(maxsize=None)
def tile_embeddings() -> dict[str, dict[str, np.ndarray]]:
    """slide_id -> {"features": (N, 32) float32, "coords": (N, 2) float32} for the three shipped slides."""
    from gigapath_core.api import build

    torch.manual_seed(0)
    enc = build("tile_encoder", "dinov2_vit", weights="random", **TINY_VIT).eval()
    out = {}
    with torch.inference_mode():
        for sid in SLIDES:
            tiles, coords = slide_tiles(sid)
            x = torch.stack([enc.transform(t) for t in tiles])
            out[sid] = {"features": enc(x).numpy().astype(np.float32), "coords": coords.astype(np.float32)}
    return out


def write_embeddings(folder: Path, slides: dict[str, dict[str, np.ndarray]] | None = None) -> Path:
    """Write ``<folder>/<slide_id>/tile_embeddings.h5`` for each slide; returns ``folder``."""
    import h5py

    for sid, d in (slides or tile_embeddings()).items():
        (folder / sid).mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / sid / "tile_embeddings.h5", "w") as f:
            f["features"] = d["features"]
            f["coords"] = d["coords"]
    return folder
