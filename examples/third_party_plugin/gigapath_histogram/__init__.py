"""RGB colour-histogram tile encoder: a stain/colour baseline with no learned weights.

Embedding of a tile = for each of R, G, B, the fraction of pixels in each of ``bins`` equal-width
intensity bins: a (3 * bins)-d vector whose three blocks each sum to 1.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, TileEncoder


class RGBHistogram(TileEncoder):
    """Per-channel colour histogram of the tile (3 x bins values in [0, 1])."""

    name = "rgb_histogram"

    class Params(PluginParams):
        bins: int = Field(16, ge=2, le=256, description="histogram bins per channel")

    def __init__(self, bins: int = 16):
        super().__init__()
        self.bins = bins
        self.embed_dim = 3 * bins

    def transform(self, tile: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1]."""
        return torch.from_numpy(np.array(tile, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 3 * bins) float32."""
        idx = (images.clamp(0, 1) * self.bins).long().clamp_max(self.bins - 1)  # (B, 3, H, W)
        one_hot = torch.nn.functional.one_hot(idx.flatten(2), self.bins).float()  # (B, 3, HW, bins)
        return one_hot.mean(2).flatten(1)


@hookimpl
def gigapath_tile_encoders():
    return [RGBHistogram]
