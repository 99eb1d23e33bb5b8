"""HIPT's ViT-4K region aggregator as a slide encoder: a ViT over 16x16 grids of 256-px tile embeddings.

Chen et al., "Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised Learning",
CVPR 2022 (Xu et al. 2024, Methods: competing methods); code and weights: github.com/mahmoodlab/HIPT
(``HIPT_4K/vision_transformer4k.py``,
``HIPT_4K/Checkpoints/vit4k_xs_dino.pth``).

A slide's tiles (grid px at 0.5 µm/px, 256-px cells; Xu et al. 2024, Methods: Preprocessing WSIs) are grouped into
4,096-px regions aligned on
the grid origin. Each region is a 16x16 grid of 384-d ViT-256 CLS embeddings (the ``hipt`` tile encoder):
``phi`` (Linear 384->192, GELU) embeds each cell, a CLS token is prepended, the 224-px position table
(1 + 14x14 rows) is resized to 16x16 as DINO does (:func:`~gigapath_plugins.tile_encoders.hipt.dino_pos_embed`),
6 pre-norm transformer blocks (192-d, 6 heads, MLP 768, LayerNorm eps 1e-6) and a final norm follow; the CLS
token is the 192-d region embedding. 2,781,504 parameters (ViT4K-XS).

HIPT encodes every 256-px cell of a region, background included; the tiler keeps only tissue tiles, so cells
without a tile are either left out of attention (``missing: mask``, default) or fed as zero embeddings
(``missing: zeros``). The slide embedding is the mean of the region embeddings (HIPT's own slide level is a
task-trained transformer + ABMIL over regions: use :meth:`HIPTRegion.region_embeddings` for that). With
``return_tile_tokens`` each tile gets its cell's contextual 192-d token from its region's ViT-4K.

Weights: the released file is a DINO training checkpoint; the teacher is used, ``module.``/``backbone.``
prefixes are removed and the DINO projection head is left out (logged); anything else must match by name.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, SlideEncoder
from gigapath_core.weights import load_state_dict_strict
from gigapath_plugins.tile_encoders.hipt import dino_pos_embed, drop_dino_head


class HIPTRegion(SlideEncoder):
    """HIPT ViT-4K region aggregator (16x16 grids of 384-d tile embeddings -> 192-d), mean over regions."""

    name = "hipt_region"

    class Params(PluginParams):
        in_dim: int = Field(384, ge=1, description="width of the tile embeddings (HIPT ViT-256: 384)")
        embed_dim: int = Field(192, ge=1, description="region embedding width (ViT4K-XS: 192)")
        depth: int = Field(6, ge=1)
        num_heads: int = Field(6, ge=1)
        mlp_ratio: float = Field(4.0, gt=0)
        pos_grid: int = Field(14, ge=1, description="side of the trained position table (224 px / 16)")
        region_size: int = Field(4096, ge=256, description="region side in grid px at 0.5 µm/px")
        tile_size: int = Field(256, ge=1, description="tile side in grid px")
        missing: Literal["mask", "zeros"] = Field("mask", description="cells without a tile: masked or zero input")
        regions_per_batch: int = Field(64, ge=1, description="regions encoded per forward (memory bound)")

        @model_validator(mode="after")
        def _check(self):
            if self.region_size % self.tile_size:
                raise ValueError("region_size must be a multiple of tile_size")
            if self.embed_dim % self.num_heads:
                raise ValueError("embed_dim must be divisible by num_heads")
            return self

    def __init__(self, in_dim=384, embed_dim=192, depth=6, num_heads=6, mlp_ratio=4.0, pos_grid=14,
                 region_size=4096, tile_size=256, missing="mask", regions_per_batch=64):
        super().__init__()
        from timm.layers import trunc_normal_
        from timm.models.vision_transformer import Block

        self.in_dim, self.embed_dim = in_dim, embed_dim
        self.region_size, self.tile_size, self.cells = region_size, tile_size, region_size // tile_size
        self.missing, self.regions_per_batch = missing, regions_per_batch
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(0.0))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
                                    for _ in range(depth))
        self.norm = norm(embed_dim)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ regions
    def region_index(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Assign tiles to regions.

        Args:
            coords: (N, 2) grid px (x, y) of tile top-left corners at 0.5 µm/px.
        Returns:
            region (N,) int64 index into the regions, in row-major order of the regions;
            cell (N,) int64 cell within its region, row-major (``row * 16 + col``);
            origins (M, 2) int64 grid px (x, y) of each region's top-left corner.
        """
        tile = torch.div(coords.to(torch.float64), self.tile_size, rounding_mode="floor").to(torch.int64)
        col, row = tile[:, 0], tile[:, 1]
        rcol = torch.div(col, self.cells, rounding_mode="floor")
        rrow = torch.div(row, self.cells, rounding_mode="floor")
        cell = (row - rrow * self.cells) * self.cells + (col - rcol * self.cells)
        span = int(rcol.max().item()) - int(rcol.min().item()) + 1 if len(rcol) else 1
        key = (rrow - rrow.min()) * span + (rcol - rcol.min()) if len(rcol) else rrow
        uniq, region = torch.unique(key, sorted=True, return_inverse=True)
        first = torch.zeros(len(uniq), dtype=torch.int64).scatter_(0, region, torch.arange(len(region)))
        origins = torch.stack([rcol[first], rrow[first]], dim=1) * self.region_size
        return region, cell, origins

    def _encode(self, emb: torch.Tensor, region: torch.Tensor, cell: torch.Tensor, m: int):
        """(n, Din) embeddings of tiles in ``m`` regions -> region CLS (m, D) and tile tokens (n, D)."""
        c2 = self.cells * self.cells
        grid = emb.new_zeros(m, c2, self.in_dim)
        grid[region, cell] = emb
        x = self.phi(grid)
        x = torch.cat([self.cls_token.expand(m, -1, -1).to(x.dtype), x], dim=1)
        x = x + dino_pos_embed(self.pos_embed, self.cells, self.cells).to(x.dtype)
        mask = None
        if self.missing == "mask":
            present = torch.zeros(m, c2 + 1, dtype=torch.bool, device=emb.device)
            present[:, 0] = True
            present[region, cell + 1] = True
            mask = present[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, attn_mask=mask)
        x = self.norm(x)
        return x[:, 0], x[region, cell + 1]

    def region_embeddings(self, tile_embeds: torch.Tensor, coords: torch.Tensor, return_tile_tokens: bool = False):
        """One slide's region embeddings.

        Args:
            tile_embeds: (N, Din) float tile embeddings; coords: (N, 2) grid px at 0.5 µm/px.
        Returns:
            (M, D) region embeddings and (M, 2) int64 region origins in grid px (row-major order), plus the
            (N, D) contextual tile tokens when ``return_tile_tokens``.
        """
        region, cell, origins = self.region_index(coords)
        m_total = len(origins)
        regions = tile_embeds.new_zeros(m_total, self.embed_dim)
        tokens = tile_embeds.new_zeros(len(tile_embeds), self.embed_dim)
        for start in range(0, m_total, self.regions_per_batch):
            stop = min(start + self.regions_per_batch, m_total)
            sel = (region >= start) & (region < stop)
            cls, tok = self._encode(tile_embeds[sel], region[sel] - start, cell[sel], stop - start)
            regions[start:stop] = cls
            tokens[sel] = tok
        return (regions, origins, tokens) if return_tile_tokens else (regions, origins)

    def forward(self, tile_embeds, coords, padding_mask=None, return_tile_tokens=False):
        """tile_embeds (B, N, 384), coords (B, N, 2) grid px, padding_mask (B, N) bool -> (B, 192) slide
        embeddings (mean of region embeddings) [, (B, N, 192) contextual tile tokens, zero at padding]."""
        b, n, _ = tile_embeds.shape
        slides = tile_embeds.new_zeros(b, self.embed_dim)
        tokens = tile_embeds.new_zeros(b, n, self.embed_dim) if return_tile_tokens else None
        for i in range(b):
            if padding_mask is None:
                keep = torch.ones(n, dtype=torch.bool, device=tile_embeds.device)
            else:
                keep = ~padding_mask[i]
            if not keep.any():
                continue
            regions, _, tok = self.region_embeddings(tile_embeds[i, keep], coords[i, keep], return_tile_tokens=True)
            slides[i] = regions.mean(0)
            if tokens is not None:
                tokens[i, keep] = tok
        return (slides, tokens) if return_tile_tokens else slides

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load ``vit4k_xs_dino.pth`` (teacher, DINO layout) or this module's own state dict, strictly.

        Raises:
            WeightsError: missing/unexpected keys (by name) or shape mismatches.
        """
        load_state_dict_strict(self, drop_dino_head(self.name, state_dict, source), source)
        self.weights_source = source


@hookimpl
def gigapath_slide_encoders():
    return [HIPTRegion]
