"""Helpers shared by the tile-encoder plugins: published input transforms, timm model creation with
config-style errors, and logging of checkpoint-layout conversions."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from gigapath_core.errors import ConfigError
from gigapath_core.kinds import TileEncoder
from gigapath_core.stages.tile_input import BatchNormalize, TransformSplit

log = logging.getLogger("gigapath")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class ModelTileEncoder(TileEncoder):
    """A tile encoder made of a ``tile_transform`` (a :class:`TileTransform`) and a ``model`` (an nn.Module whose
    forward gives (B, D) embeddings): the two methods every bundled tile encoder shares."""

    tile_transform: "TileTransform"
    model: torch.nn.Module

    def transform(self, tile: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, h, w) float32 model input (the plugin's published transform)."""
        return self.tile_transform(tile)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) float32 -> (B, embed_dim) float32 tile embeddings."""
        return self.model(images)


class TileTransform:
    """torchvision ``[Resize(resize)] -> [CenterCrop(crop)] -> ToTensor -> Normalize(mean, std)`` applied to a
    (H, W, 3) uint8 RGB array, returning (3, h, w) float32; ``None`` leaves a step out.

    A small picklable object (DataLoader workers started with spawn/forkserver get a copy of it, not of the
    model); ``compose`` is the torchvision pipeline itself.
    """

    def __init__(self, resize: int | None, crop: int | None, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bicubic"):
        from torchvision import transforms as T

        modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
        steps: list[Any] = []
        if resize:
            steps.append(T.Resize(resize, interpolation=modes[interpolation]))
        if crop:
            steps.append(T.CenterCrop(crop))
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.pil_steps = T.Compose(steps) if steps else None
        self.compose = T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def __call__(self, tile: np.ndarray) -> torch.Tensor:
        from PIL import Image

        return self.compose(Image.fromarray(np.ascontiguousarray(tile)))

    def pixels(self, tile: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8: the Resize / CenterCrop steps alone (PIL, as in ``compose``)."""
        if self.pil_steps is None:
            return tile
        from PIL import Image

        return np.asarray(self.pil_steps(Image.fromarray(np.ascontiguousarray(tile))))

    def split(self) -> TransformSplit:
        """This transform as a per-tile uint8 step and a per-batch ToTensor + Normalize
        (:mod:`gigapath_core.stages.tile_input`; same values bit for bit)."""
        return TransformSplit(self.pixels if self.pil_steps is not None else None,
                              BatchNormalize(self.mean, self.std))

    def __repr__(self) -> str:
        return f"TileTransform({self.compose})"


def create_timm_model(model_name: str, key: str = "tile_encoder.params", **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(model_name, pretrained=False, **kwargs)``.

    Raises:
        ConfigError: unknown model name (``<key>.model_name``) or kwargs the architecture does not take
            (``<key>.model_kwargs``).
    """
    import timm

    if not timm.is_model(model_name.split(".")[0]):
        raise ConfigError(f"{key}.model_name", f"timm has no model {model_name!r} (see timm.list_models())")
    try:
        return timm.create_model(model_name, pretrained=False, **kwargs)
    except TypeError as err:
        raise ConfigError(f"{key}.model_kwargs", f"{model_name} does not take these arguments: {err}") from None


def log_dropped(plugin: str, source: str, dropped: list[str], why: str) -> None:
    """Log (at INFO) the checkpoint keys a published-layout conversion leaves out on purpose, by name."""
    if dropped:
        shown = ", ".join(sorted(dropped)[:6]) + (f" (+{len(dropped) - 6} more)" if len(dropped) > 6 else "")
        log.info("%s: %s: not loaded (%s): %s", plugin, source, why, shown)
