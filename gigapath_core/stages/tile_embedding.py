"""Tile-embedding stage: stream a slide's tiles through DataLoader workers into a tile encoder, in tile order.

Workers read and decode tiles (each opens its own slide handle) and apply the encoder's input transform while
the main process runs the model, so I/O hides behind compute (``benchmarks/tile_encoder.py`` measures the
stage against a bare model loop on pre-decoded tensors). Inference runs under ``torch.inference_mode``;
bf16 autocast is on by default on CUDA only (on CPUs without bf16 units it is 5-10x slower, issue #4);
models that declare ``channels_last = True`` (CNNs) get channels-last weights and inputs. Rows of the output
follow the dataset's coordinate order whatever order batches arrive in. Resuming is per slide: the pipeline
skips a slide whose ``tile_embeddings.h5`` carries the same config fingerprint.

Failure modes, each a per-slide error (issue #11): workers are forked, or started by a forkserver for readers
that are not fork-safe (pyvips; :mod:`gigapath_core.stages.worker_start`); a worker batch that does not come
within ``tile_encoder.batch_timeout_s`` is a :class:`~gigapath_core.errors.StageStalledError`, a dead worker a
:class:`~gigapath_core.errors.ReaderWorkerDiedError`; NaN/Inf embeddings are a
:class:`~gigapath_core.errors.NonFiniteError` and nothing is written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import NonFiniteError, ReaderWorkerDiedError, SlideError, SlideReadError, StageStalledError
from ..kinds import TileEncoder
from ..threads import torch_threads
from ..watchdog import Watchdog, exit_with_parent
from .tile_input import BatchNormalize, ReusedBuffer, split_transform
from .worker_start import loader_context

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

    Item ``i`` is ``(image, i, error)``; ``error`` is "" or the reason tile ``i`` could not be read (the stage
    then fails the slide with :class:`SlideReadError`). When the transform splits
    (:func:`gigapath_core.stages.tile_input.split_transform`: the bundled encoders' transforms do), ``image`` is
    the (h, w, 3) uint8 tile after the transform's resize/crop and :attr:`batch_transform` turns a stacked batch
    of them into the model input where the model runs; otherwise ``image`` is the transform's (3, h, w) float32
    output and :attr:`batch_transform` is None. :meth:`model_input` gives tile ``i`` as the model sees it.

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
        split = split_transform(self.transform)
        self.pixels = split.pixels if split else None
        #: (B, h, w, 3) uint8 -> (B, 3, h, w) float32 model input, or None (items are model inputs already)
        self.batch_transform: BatchNormalize | None = split.normalize if split else None
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

    def item(self, tile: np.ndarray) -> torch.Tensor:
        """What a loader item carries for ``tile``: (h, w, 3) uint8 when the transform splits, else the
        transform's (3, h, w) float32."""
        if self.batch_transform is None:
            return self.transform(tile)
        if self.pixels is not None:
            tile = self.pixels(tile)
        tile = np.ascontiguousarray(tile, dtype=np.uint8)
        return torch.from_numpy(tile if tile.flags.writeable else tile.copy())  # PIL arrays are read-only

    def model_input(self, i: int) -> torch.Tensor:
        """(3, h, w) float32: tile ``i`` as the encoder gets it (the transform's output)."""
        image = self.item(self.read(i))
        return image if self.batch_transform is None else self.batch_transform(image[None])[0]

    def __getitem__(self, i: int):
        try:
            return self.item(self.read(i)), i, ""
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
    """Stack a batch's images with torch's ``default_collate``: in a worker it stacks straight into shared
    memory (``torch/utils/data/_utils/collate.py`` ``collate_tensor_fn``), which saves a copy of every batch
    on its way to the main process (``torch.stack`` then pickling copied each batch twice)."""
    errors = [(i, e) for _, i, e in batch if e]
    idx = torch.tensor([i for _, i, _ in batch], dtype=torch.long)
    if errors:
        return None, idx, errors
    return default_collate([b[0] for b in batch]), idx, []


def resolved_precision(device: torch.device, precision: str) -> str:
    """``auto`` -> ``bf16`` on CUDA, ``fp32`` elsewhere; other values unchanged."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str):
    """bf16/fp16 autocast on CUDA (``auto`` = bf16); fp32 on CPU unless asked (bf16 is slow on AVX2 CPUs)."""
    precision = resolved_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(encoder: torch.nn.Module) -> bool:
    """Whether the encoder asks for channels-last memory format (``channels_last = True``: CNN trunks)."""
    return bool(getattr(encoder, "channels_last", False))


def _next_batch(batches, in_process: bool):
    """The loader's next batch, or None at the end. Read in the main process (``num_workers: 0``), tiles are
    decoded and transformed on one torch thread, as in a reader worker: these ops are too small to split, and
    on a busy machine intra-op thread hand-offs made the stage 3-5x slower (``benchmarks/input_path.py``)."""
    with torch_threads(1) if in_process else contextlib.nullcontext():
        return next(batches, None)


#: default of ``tile_encoder.batch_timeout_s``: longest wait for one batch from the reader workers
BATCH_TIMEOUT_S = 600.0


@torch.inference_mode()
def embed_tiles(encoder: TileEncoder, dataset: Dataset, *, batch_size: int = 32, num_workers: int = 2,
                device: torch.device | str = "cpu", precision: str = "auto", batch_timeout_s: float = BATCH_TIMEOUT_S,
                on_batch: Callable[[int], None] | None = None, progress: bool = False) -> np.ndarray:
    """Embed every tile of ``dataset`` in order.

    Args:
        dataset: a :class:`TileDataset` (or any dataset of ``(image, index, error)`` items).
        batch_size: tiles per forward pass.
        num_workers: DataLoader worker processes reading/decoding tiles (0: in the main process). They are
            forked, or started by a forkserver when the dataset's reader is not fork-safe
            (:mod:`gigapath_core.stages.worker_start`).
        device: where the model runs; precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (autocast).
        batch_timeout_s: longest wait (s) for one batch from the reader workers; longer is a stall. Without
            workers the same limit only triggers a warning naming where the stage waits
            (:class:`gigapath_core.watchdog.Watchdog`).
        on_batch: called with the number of tiles of each finished batch.
        progress: show a progress bar (when no ``on_batch`` callback reports progress elsewhere).
    Returns:
        (N, D) float32 tile embeddings, all finite; row i belongs to ``dataset.coords[i]``.
    Raises:
        SlideReadError: a tile could not be read (names the tile, its level-0 position and the reason).
        StageStalledError: no batch from the reader workers within ``batch_timeout_s``.
        ReaderWorkerDiedError: a reader worker process died.
        NonFiniteError: the encoder returned NaN/Inf for some tiles (names the encoder, its weights, the count
            and the likely cause). When the whole first batch is non-finite the stage stops there.
    """
    device = torch.device(device)
    n = len(dataset)
    out = np.zeros((n, encoder.embed_dim), dtype=np.float32)
    if n == 0:
        return out
    workers = min(num_workers, -(-n // batch_size))  # no idle workers for a short slide
    reader = getattr(dataset, "reader", None)
    context = loader_context([reader]) if workers and reader else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers else None, timeout=batch_timeout_s if workers else 0,
                        multiprocessing_context=context, worker_init_fn=_reader_worker_init if workers else None)
    channels_last = use_channels_last(encoder)
    batch_transform = getattr(dataset, "batch_transform", None)
    buffer = ReusedBuffer()  # the model input of each batch on the CPU (row i is copied out before the next)
    encoder.to(device).eval()
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    seen = np.zeros(n, dtype=bool)
    nonfinite = np.zeros(n, dtype=bool)
    slide_path = getattr(dataset, "slide_path", "?")
    bar = task = None
    if progress and on_batch is None:
        from ..progress import make_progress

        bar = make_progress()
        bar.start()
        task = bar.add_task("tile embeddings", total=n)
    batches = iter(loader)
    try:
        with Watchdog(f"tile embedding of {slide_path}", batch_timeout_s,
                      f"{workers} reader worker(s), reader {reader!r}" if workers else f"reader {reader!r}") as dog, \
                autocast_context(device, precision):
            while (batch := _next_batch(batches, in_process=not workers)) is not None:
                images, idx, errors = batch
                if errors:
                    i, e = errors[0]
                    coords = getattr(dataset, "coords", None)
                    where = f" at level-0 ({coords[i][0]}, {coords[i][1]})" if coords is not None else ""
                    raise SlideReadError(slide_path, f"cannot read tile {i}{where}: {e}")
                images = images.to(device, non_blocking=device.type == "cuda")  # pinned by the loader on CUDA
                if batch_transform is not None and device.type == "cpu":  # one thread, as in _next_batch
                    b, h, w, _ = images.shape
                    with torch_threads(1):
                        images = batch_transform(images, channels_last, out=buffer.get((b, 3, h, w), channels_last))
                elif batch_transform is not None:
                    images = batch_transform(images, channels_last)
                elif channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                feats = encoder(images).float().cpu().numpy()
                rows = idx.numpy()
                nonfinite[rows] = ~np.isfinite(feats).all(axis=1)
                out[rows] = feats
                seen[rows] = True
                dog.beat()
                if on_batch:
                    on_batch(len(rows))
                if bar is not None:
                    bar.advance(task, len(rows))
                if nonfinite[rows].all() and seen.sum() == len(rows) and len(rows) < n:
                    break  # the whole first batch is NaN/Inf: broken weights, not a few odd tiles; stop here
    except RuntimeError as err:
        stop = _loader_failure(err, slide_path, reader, workers, batch_timeout_s, int(seen.sum()), n)
        if stop is None:
            raise
        _kill_workers(batches)
        raise stop from None
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:  # now, not when the iterator is garbage-collected
            shutdown()
        if bar is not None:
            bar.stop()
    if nonfinite.any():
        raise _nonfinite_error(encoder, slide_path, nonfinite, seen, getattr(dataset, "coords", None), device,
                               precision)
    if not seen.all():  # pragma: no cover - a dataset that skips indices
        raise RuntimeError(f"tile embedding produced {int(seen.sum())} of {n} rows")
    return out


def _reader_worker_init(worker_id: int) -> None:
    """In each reader worker: end with the process that started it (the stage's process, or the forkserver,
    which ends with it), even when that process is killed with ``kill -9`` while this worker is blocked in a
    slide library (torch's own check only runs between batches)."""
    exit_with_parent(os.getppid())


def _loader_failure(err: RuntimeError, slide_path: str, reader, workers: int, timeout: float, done: int,
                    n: int) -> SlideError | None:
    """The per-slide error for a DataLoader stall or a dead worker, or None for any other RuntimeError.

    torch raises RuntimeError for both: ``DataLoader timed out after N seconds`` and ``DataLoader worker (pid(s)
    ...) exited unexpectedly`` / ``... is killed by signal`` (``torch/utils/data/dataloader.py``
    ``_try_get_data`` and ``_get_data``; the SIGCHLD handler of ``torch/utils/data/_utils/signal_handling.py``).
    ``tests/test_faults_workers.py`` fails if a torch release changes them."""
    msg = str(err)
    where = f"reader {reader!r}, {workers} worker(s), {done} of {n} tiles embedded"
    if msg.startswith("DataLoader timed out"):
        return StageStalledError(slide_path, f"tile-embedding stage: no tile batch from the reader workers for "
                                             f"{timeout:g} s ({where}); the slide library may be stuck on this file "
                                             f"(limit: tile_encoder.batch_timeout_s; num_workers: 0 reads in the "
                                             f"main process)")
    if msg.startswith("DataLoader worker"):
        return ReaderWorkerDiedError(slide_path, f"tile-embedding stage: a reader worker process died ({where}): "
                                                 f"{msg}; killed, out of memory, or a crash in the slide library")
    return None


def _kill_workers(batches) -> None:
    """SIGKILL the reader workers of a stalled loader (a worker blocked in native code ignores the polite
    shutdown, which would then wait 5 s per worker before terminating it).

    Their pids are first taken off torch's SIGCHLD watch (as the loader's own shutdown does before it
    terminates workers), else torch raises "worker killed" over the stall being reported. Uses torch
    internals (``_utils.signal_handling._remove_worker_pids``); if they change, the loader's own shutdown
    stops the workers, only more slowly."""
    try:
        from torch.utils.data._utils import signal_handling

        if getattr(batches, "_worker_pids_set", False):
            signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False
    except Exception:  # pragma: no cover - torch internals changed
        return
    for w in getattr(batches, "_workers", []):
        with contextlib.suppress(Exception):
            if w.is_alive():
                w.kill()


def _nonfinite_error(encoder, slide_path: str, nonfinite: np.ndarray, seen: np.ndarray, coords, device,
                     precision: str) -> NonFiniteError:
    n, k, done = len(seen), int(nonfinite.sum()), int(seen.sum())
    i = int(np.argmax(nonfinite))
    where = f" at level-0 ({coords[i][0]}, {coords[i][1]})" if coords is not None else ""
    count = f"{k} of {n} tiles" if done == n else f"all {k} tiles of the first batch (stopped there; {n} tiles in all)"
    name = getattr(type(encoder), "name", "") or type(encoder).__name__
    weights = getattr(encoder, "weights_source", "?")
    used = resolved_precision(torch.device(device), precision)
    cause = "check the weights (a NaN/Inf parameter or a checkpoint for another architecture)"
    if used != "fp32":
        cause += f", or the {used} autocast overflowed: try tile_encoder.precision: fp32"
    return NonFiniteError(slide_path, f"tile-embedding stage: tile encoder {name!r} (weights {weights}) produced "
                                      f"non-finite embeddings (NaN/Inf) for {count}, first tile {i}{where}; {cause}")


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
