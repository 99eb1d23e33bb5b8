"""Tile-embedding stage: stream tiles through DataLoader workers into a tile encoder, in tile order."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import SlideReadError
from ..kinds import TileEncoder

EMBEDDINGS_FILE = "tile_embeddings.h5"


class TileDataset(Dataset):
    """Tiles of one slide, read lazily (each DataLoader worker opens its own slide handle).

    Item ``i`` is ``(image (3, h, w) float32, i, error)``; ``error`` is "" or the reason tile ``i`` could not
    be read (the stage then fails the slide with :class:`SlideReadError`).

    Args:
        slide_path: the slide file.
        reader: SlideReader plugin name that opened it in the tiling stage.
        tiler: the Tiler plugin (its ``read_tile`` reads and resamples).
        coords: (N, 2) int level-0 px top-left corners; level, read_size, tile_size: from the tile grid.
        transform: tile encoder transform ((H, W, 3) uint8 -> (3, h, w) float32).
    """

    def __init__(self, slide_path: str, reader: str, tiler, coords: np.ndarray, level: int, read_size: int,
                 tile_size: int, transform: Callable[[np.ndarray], torch.Tensor]):
        self.slide_path, self.reader, self.tiler = slide_path, reader, tiler
        self.coords = np.asarray(coords).reshape(-1, 2)
        self.level, self.read_size, self.tile_size = level, read_size, tile_size
        self.transform = transform
        self._wsi = None

    def __len__(self) -> int:
        return len(self.coords)

    def _open(self):
        if self._wsi is None:
            from ..api import build

            self._wsi = build("slide_reader", self.reader).open(self.slide_path)
        return self._wsi

    def read(self, i: int) -> np.ndarray:
        return self.tiler.read_tile(self._open(), self.coords[i], self.level, self.read_size, self.tile_size)

    def __getitem__(self, i: int):
        try:
            return self.transform(self.read(i)), i, ""
        except Exception as err:  # reported by the main process with the slide path
            return torch.zeros(0), i, f"{type(err).__name__}: {err}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_wsi"] = None  # slide handles are not picklable; workers reopen
        return state


def _collate(batch):
    errors = [(i, e) for _, i, e in batch if e]
    if errors:
        return None, torch.tensor([i for _, i, _ in batch]), errors
    return torch.stack([b[0] for b in batch]), torch.tensor([i for _, i, _ in batch]), []


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA (``auto`` = bf16); fp32 on CPU unless asked (bf16 is slow on AVX2 CPUs)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def embed_tiles(encoder: TileEncoder, dataset: TileDataset, *, batch_size: int = 32, num_workers: int = 2,
                device: torch.device = torch.device("cpu"), precision: str = "auto",
                on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """Embed every tile of ``dataset`` in order.

    Returns:
        (N, D) float32 tile embeddings; row i belongs to ``dataset.coords[i]``.
    Raises:
        SlideReadError: a tile could not be read (names the tile and the reason).
    """
    n = len(dataset)
    out = np.zeros((n, encoder.embed_dim), dtype=np.float32)
    if n == 0:
        return out
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if num_workers else None)
    encoder.to(device).eval()
    with autocast_context(device, precision):
        for images, idx, errors in loader:
            if errors:
                i, e = errors[0]
                x, y = dataset.coords[i]
                raise SlideReadError(dataset.slide_path, f"cannot read tile {i} at level-0 ({x}, {y}): {e}")
            feats = encoder(images.to(device, non_blocking=True))
            out[idx.numpy()] = feats.float().cpu().numpy()
            if on_batch:
                on_batch(len(idx))
    return out


def write_tile_embeddings(path: Path, features: np.ndarray, grid_coords: np.ndarray, level0_coords: np.ndarray,
                          attrs: dict) -> None:
    """``tile_embeddings.h5``: ``features`` (N, D) float32, ``coords`` (N, 2) int64 grid px at 0.5 µm/px
    (what the slide encoder takes), ``coords_level0`` (N, 2) int64 level-0 px."""
    from ..store import write_h5

    write_h5(path, {"features": features.astype(np.float32),
                    "coords": np.asarray(grid_coords, dtype=np.int64).reshape(-1, 2),
                    "coords_level0": np.asarray(level0_coords, dtype=np.int64).reshape(-1, 2)}, attrs)
