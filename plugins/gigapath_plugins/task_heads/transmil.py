"""TransMIL head (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide
Image Classification", NeurIPS 2021), with the layer sizes of the authors' ``models/TransMIL.py``
(szc19990412/TransMIL).

For tile tokens h_1..h_N (B, N, in_dim)::

    h  = ReLU(Linear(in_dim, 512) h)                          (paper §4.2, "_fc1")
    h  = [h, h_1..h_{M-N}] with M = ceil(sqrt(N))^2           (squaring: the first tokens repeated)
    h  = [cls, h]                                              (learnable class token)
    h  = h + NystromAttention(LayerNorm(h))                    (TransLayer 1: 8 heads x 64, 256 landmarks)
    h  = PPEG(h): cls kept; patch tokens as a sqrt(M) x sqrt(M) grid, x + DWConv7(x) + DWConv5(x) + DWConv3(x)
    h  = h + NystromAttention(LayerNorm(h))                    (TransLayer 2)
    logits = Linear(512, C)(LayerNorm(h)[:, 0])

Attention dropout 0.1, 6 pseudo-inverse iterations, value residual conv (kernel 33) as the authors' TransLayer.
With ``in_dim`` 1024 and 2 classes the head has 2,672,146 parameters (tests/test_mil_heads.py counts them
layer by layer from the reference). Padding positions (``padding_mask`` True) are dropped per slide first.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, TaskHead

from .nystrom import NystromAttention


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)), with TransMIL's settings (dim/8 per head, dim/2 landmarks)."""

    def __init__(self, dim: int, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads, num_landmarks=dim // 2,
                                     pinv_iterations=6, residual_kernel=33, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depth-wise 7/5/3 convolutions over the square token grid (§3.3)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls, grid = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj(grid) + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMILHead(TaskHead):
    """TransMIL (Shao et al. 2021): Nyström-attention transformer + PPEG over tile tokens, CLS-token classifier."""

    name = "transmil"

    class Params(PluginParams):
        in_dim: int = Field(768, ge=1, description="width of the tile tokens (filled in by finetune)")
        num_classes: int = Field(2, ge=1, description="number of logits (filled in by finetune)")
        dim: int = Field(512, ge=16, multiple_of=8, description="transformer width (TransMIL: 512)")
        heads: int = Field(8, ge=1, description="attention heads (TransMIL: 8)")
        dropout: float = Field(0.1, ge=0, lt=1, description="attention output dropout (TransMIL: 0.1)")

    def __init__(self, in_dim=768, num_classes=2, dim=512, heads=8, dropout=0.1):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def _one(self, h: torch.Tensor) -> torch.Tensor:
        """(1, N, in_dim) -> (1, num_classes)."""
        h = self.fc1(h)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = torch.arange(side * side - n, device=h.device) % n  # the first tokens again (cycled if N tiny)
        h = torch.cat([h, h[:, extra]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        h = self.layer2(self.ppeg(self.layer1(h), side))
        return self.classifier(self.norm(h)[:, 0])

    def forward(self, tile_tokens, padding_mask=None, slide_embed=None, tile_features=None):
        """tile_tokens (B, N, in_dim), padding_mask (B, N) bool -> logits (B, num_classes) float32.

        Raises ValueError if tile_tokens is missing."""
        if tile_tokens is None:
            raise ValueError("the transmil head needs tile tokens (B, N, D)")
        masks = padding_mask if padding_mask is not None else [None] * tile_tokens.shape[0]
        return torch.cat([self._one((t if m is None else t[~m])[None]) for t, m in zip(tile_tokens, masks)]).float()


@hookimpl
def gigapath_task_heads():
    return [TransMILHead]
