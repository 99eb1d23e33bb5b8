"""ABMIL-only slide aggregator: gated-attention pooling of tile embeddings (Ilse et al., ICML 2018).

The "LongNet vs ABMIL-only" ablation of Prov-GigaPath (Xu et al. 2024, Methods: mutation prediction, cancer subtyping)
replaces the LongNet slide encoder by this
pooling over the frozen tile embeddings. For tile embeddings ``h_i`` (after the optional projection
``h_i = ReLU(W_p x_i + b_p)``), Ilse et al. Eq. 9:

    a_i = exp(w^T (tanh(V h_i + b_V) * sigmoid(U h_i + b_U)) + b_w) / sum_j exp(...)
    slide embedding z = sum_i a_i h_i

Padding tiles get zero weight. The weights are meaningful after training (fine-tuning job); an untrained
aggregator starts from PyTorch's default Linear initialisation.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.errors import ConfigError
from gigapath_core.kinds import PluginParams, SlideEncoder


class GatedAttentionPool(SlideEncoder):
    """Gated-attention MIL pooling (ABMIL, Ilse et al. 2018) of tile embeddings; coordinates unused."""

    name = "abmil_only"

    class Params(PluginParams):
        in_dim: int = Field(1536, ge=1, description="width of the tile embeddings")
        attn_dim: int = Field(128, ge=1, description="width L of the gated attention (Ilse et al.: 128)")
        proj_dim: int | None = Field(None, ge=1, description="optional Linear+ReLU projection of the tiles first "
                                                              "(None: pool the tile embeddings themselves)")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the projected tiles in training")

    def __init__(self, in_dim: int = 1536, attn_dim: int = 128, proj_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.in_dim = in_dim
        self.embed_dim = proj_dim or in_dim
        self.proj = nn.Sequential(nn.Linear(in_dim, proj_dim), nn.ReLU()) if proj_dim else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.attention_v = nn.Linear(self.embed_dim, attn_dim)
        self.attention_u = nn.Linear(self.embed_dim, attn_dim)
        self.attention_w = nn.Linear(attn_dim, 1)

    def tile_features(self, tile_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, Din) -> h (B, N, D), the vectors that are pooled."""
        if tile_embeds.dim() != 3 or tile_embeds.shape[-1] != self.in_dim:
            raise ConfigError("tile_embeds", f"expected (B, N, {self.in_dim}), got {tuple(tile_embeds.shape)}")
        return self.dropout(self.proj(tile_embeds.to(self.attention_v.weight.dtype)))

    def attention(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights a (B, N), summing to 1 over each slide's valid tiles (0 at padding; all 0 if a
        slide has no valid tile)."""
        logits = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))).squeeze(-1)
        if padding_mask is not None:
            logits = logits.masked_fill(padding_mask.to(torch.bool), float("-inf"))
        return torch.nan_to_num(torch.softmax(logits.float(), dim=1), nan=0.0).to(h.dtype)

    def forward(self, tile_embeds, coords=None, padding_mask=None, return_tile_tokens=False):
        """tile_embeds (B, N, Din), coords unused, padding_mask (B, N) bool -> (B, D) slide embeddings; with
        ``return_tile_tokens`` also h (B, N, D) (the pooled tile vectors)."""
        h = self.tile_features(tile_embeds)
        a = self.attention(h, padding_mask)
        pooled = torch.einsum("bn,bnd->bd", a, h)
        return (pooled, h) if return_tile_tokens else pooled


@hookimpl
def gigapath_slide_encoders():
    return [GatedAttentionPool]
