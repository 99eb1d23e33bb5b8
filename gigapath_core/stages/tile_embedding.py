"""Tile-embedding stage: stream a slide's tiles through DataLoader workers into a tile encoder, in tile order.

Workers read and decode tiles (each opens its own slide handle) and apply the encoder's input transform while
the main process runs the model, so I/O hides behind compute (``benchmarks/tile_encoder.py`` measures the
stage against a bare model loop on pre-decoded tensors). Inference runs under ``torch.inference_mode``;
bf16 autocast is on by default on CUDA only (on CPUs without bf16 units it is 5-10x slower, issue #4);
models that declare ``channels_last = True`` (CNNs) get channels-last weights and inputs. Rows of the output
follow the dataset's coordinate order whatever order batches arrive in. Resuming is per slide: the pipeline
skips a slide whose ``tile_embeddings.h5`` carries the same config fingerprint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import SlideReadError
from ..kinds import TileEncoder

EMBEDDINGS_FILE = "tile_embeddings.h5"


def _picklable_transform(transform: Callable[[np.ndarray], torch.Tensor]) -> Callable[[np.ndarray], torch.Tensor]:
    """A bound ``encoder.transform`` would carry the whole model into spawn/forkserver workers; use the
    encoder's ``tile_transform`` object instead when it declares one (same function, no weights)."""
    owner = getattr(transform, "__self__", None)
    if isinstance(owner, torch.nn.Module) and callable(getattr(owner, "tile_transform", None)):
        if getattr(transform, "__func__", None) is getattr(type(owner), "transform", None):
            return owner.tile_transform
    return transform


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
        self.transform = _picklable_transform(transform)
        self._wsi = None

    def __len__(self) -> int:
        return len(self.coords)

    def _open(self):
        if self._wsi is None:
            from ..api import build

            self._wsi = build("slide_reader", self.reader).open(self.slide_path)
        return self._wsi

    def read(self, i: int) -> np.ndarray:
        """(tile_size, tile_size, 3) uint8 RGB pixels of tile ``i``."""
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

    def close(self) -> None:
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None


def _collate(batch):
    errors = [(i, e) for _, i, e in batch if e]
    idx = torch.tensor([i for _, i, _ in batch], dtype=torch.long)
    if errors:
        return None, idx, errors
    return torch.stack([b[0] for b in batch]), idx, []


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA (``auto`` = bf16); fp32 on CPU unless asked (bf16 is slow on AVX2 CPUs)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(encoder: torch.nn.Module) -> bool:
    """Whether the encoder asks for channels-last memory format (``channels_last = True``: CNN trunks)."""
    return bool(getattr(encoder, "channels_last", False))


@torch.inference_mode()
def embed_tiles(encoder: TileEncoder, dataset: Dataset, *, batch_size: int = 32, num_workers: int = 2,
                device: torch.device | str = "cpu", precision: str = "auto",
                on_batch: Callable[[int], None] | None = None, progress: bool = False) -> np.ndarray:
    """Embed every tile of ``dataset`` in order.

    Args:
        dataset: a :class:`TileDataset` (or any dataset of ``(image, index, error)`` items).
        batch_size: tiles per forward pass.
        num_workers: DataLoader worker processes reading/decoding tiles (0: in the main process).
        device: where the model runs; precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (autocast).
        on_batch: called with the number of tiles of each finished batch.
        progress: show a progress bar (when no ``on_batch`` callback reports progress elsewhere).
    Returns:
        (N, D) float32 tile embeddings; row i belongs to ``dataset.coords[i]``.
    Raises:
        SlideReadError: a tile could not be read (names the tile, its level-0 position and the reason).
    """
    device = torch.device(device)
    n = len(dataset)
    out = np.zeros((n, encoder.embed_dim), dtype=np.float32)
    if n == 0:
        return out
    workers = min(num_workers, -(-n // batch_size))  # no idle workers for a short slide
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers else None)
    channels_last = use_channels_last(encoder)
    encoder.to(device).eval()
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    seen = np.zeros(n, dtype=bool)
    bar = task = None
    if progress and on_batch is None:
        from ..progress import make_progress

        bar = make_progress()
        bar.start()
        task = bar.add_task("tile embeddings", total=n)
    try:
        with autocast_context(device, precision):
            for images, idx, errors in loader:
                if errors:
                    i, e = errors[0]
                    coords = getattr(dataset, "coords", None)
                    where = f" at level-0 ({coords[i][0]}, {coords[i][1]})" if coords is not None else ""
                    raise SlideReadError(getattr(dataset, "slide_path", "?"), f"cannot read tile {i}{where}: {e}")
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                feats = encoder(images)
                rows = idx.numpy()
                out[rows] = feats.float().cpu().numpy()
                seen[rows] = True
                if on_batch:
                    on_batch(len(rows))
                if bar is not None:
                    bar.advance(task, len(rows))
    finally:
        if bar is not None:
            bar.stop()
    if not seen.all():  # pragma: no cover - a dataset that skips indices
        raise RuntimeError(f"tile embedding produced {int(seen.sum())} of {n} rows")
    return out


def write_tile_embeddings(path: Path, features: np.ndarray, coords: np.ndarray, grid_coords: np.ndarray,
                          attrs: dict, dataset_attrs: dict[str, dict] | None = None) -> None:
    """``tile_embeddings.h5`` (format_version 2, ``docs/formats.md``): ``features`` (N, D) float32, ``coords``
    (N, 2) int64 level-0 px top-left (x, y), ``grid_coords`` (N, 2) int64 grid px at 0.5 µm/px (what the slide
    encoder takes).

    Args:
        attrs: root attributes (the pipeline records ``tile_encoder``, ``weights_source``, ``embed_dim`` and the
            fingerprint).
        dataset_attrs: attributes of ``coords`` / ``grid_coords`` (the pipeline copies those of ``tiles.h5``:
            the TRIDENT/CLAM attributes of :func:`gigapath_core.interop.coords_attrs`).
    """
    from ..store import write_h5

    write_h5(path, {"features": features.astype(np.float32),
                    "coords": np.asarray(coords, dtype=np.int64).reshape(-1, 2),
                    "grid_coords": np.asarray(grid_coords, dtype=np.int64).reshape(-1, 2)}, attrs,
             dataset_attrs=dataset_attrs)
