"""Gated-attention MIL head (ABMIL; Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning",
ICML 2018, eq. 9) over contextual tile embeddings, then a linear classifier (Xu et al. 2024, Methods: mutation
prediction, cancer subtyping).

For tile embeddings ``h_1..h_N`` (the slide encoder's tile tokens)::

    a_k = exp(w^T (tanh(V h_k) * sigm(U h_k))) / sum_j exp(w^T (tanh(V h_j) * sigm(U h_j)))
    z   = sum_k a_k h_k                   (slide embedding, width of h)
    logits = W z + b

``V``, ``U`` are ``Linear(D, attn_dim)`` (with bias, as the authors' code), ``w`` is ``Linear(attn_dim, 1)``;
padding positions get ``a_k = 0``. Optional ``proj_dim`` inserts ``Linear(D, proj_dim) + GELU`` before the
attention (CLAM-style). Optional ``shortcut`` adds ``Linear(Din, D)`` of the raw tile features to the tile tokens
before pooling: the paper's "shortcut from tile features into the slide-level head" for subtyping (our reading:
the paper gives no formula).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, TaskHead


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al. 2018, eq. 9): (B, N, D) -> (B, D) pooled, (B, N) weights."""

    def __init__(self, in_dim: int, attn_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.V = nn.Linear(in_dim, attn_dim)
        self.U = nn.Linear(in_dim, attn_dim)
        self.w = nn.Linear(attn_dim, 1)
        self.drop = nn.Dropout(dropout)

    def scores(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N) attention logits; ``-inf`` at padding positions (``padding_mask`` True)."""
        s = self.w(self.drop(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h)))).squeeze(-1)
        if padding_mask is not None:
            s = s.masked_fill(padding_mask, float("-inf"))
        return s

    def forward(self, h: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.softmax(self.scores(h, padding_mask).float(), dim=-1)
        return torch.einsum("bn,bnd->bd", a.to(h.dtype), h), a


class ABMILHead(TaskHead):
    """Gated-attention MIL (Ilse et al. 2018) over tile tokens + linear classifier; optional tile-feature shortcut."""

    name = "abmil"

    class Params(PluginParams):
        in_dim: int = Field(768, ge=1, description="width D of the tile tokens (slide encoder output)")
        num_classes: int = Field(2, ge=1, description="number of logits: 1 (binary), C (multi-class), L (multi-label)")
        attn_dim: int = Field(128, ge=1, description="hidden width of the gated attention (V, U)")
        proj_dim: int | None = Field(None, ge=1, description="Linear+GELU to this width before the attention")
        dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the attention and before the classifier")
        shortcut: bool = Field(False, description="add Linear(raw tile features) to the tile tokens (subtyping setup)")
        shortcut_dim: int | None = Field(None, ge=1, description="width of the raw tile features (default: in_dim)")

    def __init__(self, in_dim=768, num_classes=2, attn_dim=128, proj_dim=None, dropout=0.1, shortcut=False,
                 shortcut_dim=None):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.shortcut = nn.Linear(shortcut_dim or in_dim, in_dim) if shortcut else None
        self.proj = nn.Sequential(nn.Linear(in_dim, proj_dim), nn.GELU(), nn.Dropout(dropout)) if proj_dim else None
        width = proj_dim or in_dim
        self.pool = GatedAttentionPool(width, attn_dim, dropout)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def _tokens(self, tile_tokens, tile_features):
        if tile_tokens is None:
            raise ValueError("the abmil head needs tile tokens (B, N, D)")
        h = tile_tokens
        if self.shortcut is not None:
            if tile_features is None:
                raise ValueError("the abmil head was built with shortcut=True and needs tile_features (B, N, Din)")
            h = h + self.shortcut(tile_features.to(h.dtype))
        return self.proj(h) if self.proj is not None else h

    def forward(self, tile_tokens, padding_mask=None, slide_embed=None, tile_features=None):
        """tile_tokens (B, N, in_dim), padding_mask (B, N) bool, tile_features (B, N, shortcut_dim) if
        ``shortcut`` -> logits (B, num_classes) float32. ``slide_embed`` is unused.

        Raises ValueError if tile_tokens (or tile_features with ``shortcut``) is missing."""
        pooled, _ = self.pool(self._tokens(tile_tokens, tile_features), padding_mask)
        return self.classifier(self.drop(pooled)).float()

    @torch.no_grad()
    def attention(self, tile_tokens, padding_mask=None, tile_features=None) -> torch.Tensor:
        """(B, N) attention weights a_k (sum to 1 over non-padding tiles), e.g. for heatmaps."""
        return self.pool(self._tokens(tile_tokens, tile_features), padding_mask)[1]

    @torch.no_grad()
    def tile_logits(self, tile_tokens, padding_mask=None, tile_features=None) -> torch.Tensor:
        """(B, N, num_classes) float32 logits of each tile alone, ``W h_k + b``. Without dropout the slide
        logits equal ``sum_k a_k * tile_logits_k`` (the classifier is linear), e.g. for heatmaps."""
        return self.classifier(self._tokens(tile_tokens, tile_features)).float()


@hookimpl
def gigapath_task_heads():
    return [ABMILHead]
