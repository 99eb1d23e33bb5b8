"""Mean pooling of tile embeddings: the simplest slide aggregator, an ablation baseline."""

from __future__ import annotations

from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, SlideEncoder


class MeanPool(SlideEncoder):
    """Mean of tile embeddings (no parameters); padding positions are excluded."""

    name = "mean"

    class Params(PluginParams):
        in_dim: int = Field(1536, ge=1, description="width of the tile embeddings")

    def __init__(self, in_dim: int = 1536):
        super().__init__()
        self.in_dim = self.embed_dim = in_dim

    def forward(self, tile_embeds, coords, padding_mask=None, return_tile_tokens=False):
        """tile_embeds (B, N, D), coords (B, N, 2) unused, padding_mask (B, N) bool -> (B, D)."""
        if padding_mask is None:
            pooled = tile_embeds.mean(dim=1)
        else:
            keep = (~padding_mask).unsqueeze(-1).to(tile_embeds.dtype)
            pooled = (tile_embeds * keep).sum(1) / keep.sum(1).clamp_min(1)
        return (pooled, tile_embeds) if return_tile_tokens else pooled


@hookimpl
def gigapath_slide_encoders():
    return [MeanPool]
