"""Tile input transform split in two: a per-tile uint8 step in the reader workers, ToTensor + Normalize once per
batch where the model runs (issue #16.1: "batch transforms as tensors, uint8 -> float once per batch").

The published tile-encoder transforms are torchvision ``[Resize] -> [CenterCrop] -> ToTensor -> Normalize``. The
first two work on uint8 pixels; the last two turn each uint8 value ``v`` of channel ``c`` into
``(float32(v) / 255 - mean[c]) / std[c]``, one element at a time. Done per tile in a worker, that costs ~1.4 ms
per 256-px tile and sends 4x the bytes through shared memory (786 KB of float32 instead of 192 KB of uint8);
done on a stacked (B, h, w, 3) uint8 batch with the same float32 operations it costs ~0.3 ms per tile, gives the
same numbers bit for bit (``tests/test_tile_input.py``), and on CUDA moves a quarter of the bytes to the device.

A transform opts in by offering ``split() -> TransformSplit`` (the bundled plugins' ``TileTransform`` does); any
other transform is applied per tile as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: (H, W, 3) uint8 RGB tile -> (h, w, 3) uint8 RGB (resize / crop); None: the tile unchanged
PixelStep = Callable[[np.ndarray], np.ndarray] | None


class BatchNormalize:
    """torchvision ``ToTensor() -> Normalize(mean, std)`` on a whole batch: (B, h, w, 3) uint8 -> (B, 3, h, w)
    float32, the same float32 operations in the same order (divide by 255, subtract the mean, divide by the
    standard deviation), so every element equals the per-tile transform's.

    The divisor 255 is a tensor on the batch's device, not a Python number: CUDA replaces division by a CPU
    scalar with multiplication by its reciprocal, which may differ in the last bit.

    Args:
        mean, std: per-channel (R, G, B) values of ``Normalize``.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or not all(self.std):
            raise ValueError(f"BatchNormalize needs 3 means and 3 non-zero stds, got {self.mean}, {self.std}")
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: torch.Tensor, channels_last: bool = False, out: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """(B, h, w, 3) uint8 (any device) -> (B, 3, h, w) float32 on that device; ``channels_last``: the
        result in channels-last memory format (no extra copy: it is the uint8 batch's own layout). ``out``: a
        float32 tensor of the result's shape to write into (a buffer reused across batches saves the page
        faults of a fresh 25 MB allocation per 32 tiles on the CPU)."""
        if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected a (B, h, w, 3) uint8 batch, got {tuple(batch.shape)} {batch.dtype}")
        nchw = batch.permute(0, 3, 1, 2)  # a view: channels-last strides
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if out is None:
            out = torch.empty(nchw.shape, dtype=torch.float32, device=batch.device, memory_format=fmt)
        elif out.shape != nchw.shape or out.dtype != torch.float32 or out.device != batch.device:
            raise ValueError(f"out must be float32 {tuple(nchw.shape)} on {batch.device}, got {tuple(out.shape)} "
                             f"{out.dtype} on {out.device}")
        out.copy_(nchw)  # uint8 -> float32 and the layout change in one pass
        scale, mean, std = self._constants(batch.device)
        return out.div_(scale).sub_(mean).div_(std)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """255, mean and std as float32 tensors on ``device`` (made once per device)."""
        key = str(device)
        if key not in self._cache:
            self._cache[key] = (torch.tensor(255.0, device=device),
                                torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1),
                                torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        return self._cache[key]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": {}}  # device tensors stay in their process

    def __repr__(self) -> str:
        return f"BatchNormalize(mean={self.mean}, std={self.std})"


class ReusedBuffer:
    """One float32 (B, 3, h, w) CPU buffer handed out batch after batch (the first ``n`` rows for a shorter
    last batch), re-made when the shape or memory format changes. Only for a consumer that is done with a
    batch before it asks for the next (the tile-embedding loop copies each batch's embeddings out first)."""

    def __init__(self):
        self._buf: torch.Tensor | None = None

    def get(self, shape: tuple[int, ...], channels_last: bool) -> torch.Tensor:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        buf = self._buf
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or \
                not buf.is_contiguous(memory_format=fmt):
            buf = self._buf = torch.empty(shape, dtype=torch.float32, memory_format=fmt)
        return buf[:shape[0]]


@dataclass(frozen=True)
class TransformSplit:
    """A tile transform as ``normalize(stack(pixels(tile) for tile in batch))``.

    Attributes:
        pixels: the per-tile uint8 step (run in the reader workers), or None for none.
        normalize: the per-batch ToTensor + Normalize (run where the model runs).
    """

    pixels: PixelStep
    normalize: BatchNormalize


def split_transform(transform: Callable) -> TransformSplit | None:
    """The transform's :class:`TransformSplit` when it offers one (``transform.split()``), else None (the
    transform is then applied per tile, whatever it does)."""
    split = getattr(transform, "split", None)
    if not callable(split):
        return None
    result = split()
    return result if isinstance(result, TransformSplit) else None
