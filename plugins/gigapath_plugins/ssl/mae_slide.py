"""Masked autoencoding of tile embeddings with a slide encoder (Prov-GigaPath slide pretraining, Xu et al. 2024,
Methods: slide encoder (LongNet)).

The tile encoder is frozen: inputs are the ``features`` (N, Din) and ``coords`` (N, 2, grid px) of
``tile_embeddings.h5``. Each view is augmented (grid crop 0.875, horizontal flip p = 0.5, random shift
inside the 1,000-cell grid), optionally subsampled to ``max_tiles``, and a random ``mask_ratio`` of its tiles
is masked. The encoder (LongNet by default; any ``slide_encoder`` plugin) sees only the visible tiles with
their coordinates; a light decoder (a few dense transformer blocks over visible tokens + mask tokens, with
2-D sin-cos positions) reconstructs the masked tile embeddings. Loss: mean squared error on masked tiles,
against per-tile normalised targets when ``norm_target`` (He et al., MAE, CVPR 2022, "norm_pix_loss").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, SSLObjective

from .slide_views import augment_slide, pad_slides, random_mask, sincos_2d, subsample


class LightDecoder(nn.Module):
    """Dense pre-norm transformer blocks (timm ``Block``) over all N positions; padding is never attended.

    ``forward(x (B, N, dim), coords (B, N, 2) grid px, padding_mask (B, N) bool) -> (B, N, dim)``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, tile_size: int = 256):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.tile_size = tile_size
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + sincos_2d(coords, x.shape[-1], self.tile_size).to(x.dtype)
        attn_mask = None if padding_mask is None else (~padding_mask)[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask)
        return self.norm(x)


class SlideMAE(SSLObjective):
    """Masked autoencoder over tile embeddings: slide encoder (LongNet) + light decoder (Xu et al. 2024, Methods:
    slide encoder (LongNet))."""

    name = "mae_slide"
    data = "slides"

    class Params(PluginParams):
        slide_encoder: str = Field("longnet", description="slide_encoder plugin or preset (the encoder)")
        slide_encoder_params: dict[str, Any] = Field(default_factory=dict)
        slide_encoder_weights: str | list[str] | None = Field("random", description="encoder initialisation")
        mask_ratio: float = Field(0.75, gt=0, lt=1, description="fraction of a slide's tiles to mask")
        decoder_dim: int = Field(512, ge=4, description="decoder width (divisible by 4 and by decoder_heads)")
        decoder_depth: int = Field(2, ge=1)
        decoder_heads: int = Field(8, ge=1)
        norm_target: bool = Field(True, description="reconstruct per-tile standardised embeddings")
        crop_ratio: float = Field(0.875, gt=0, le=1, description="grid crop side ratio (1 = no crop)")
        flip_p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
        random_shift: bool = Field(True, description="random whole-cell shift inside the position grid")
        max_tiles: int | None = Field(None, ge=2, description="random subset per view (memory bound)")
        tile_size: int = Field(256, ge=1, description="grid px per position cell")
        n_cells: int = Field(1000, ge=1, description="position grid side in cells")

    @classmethod
    def from_params(cls, params):
        return cls(params)

    def __init__(self, params: "SlideMAE.Params"):
        super().__init__()
        from gigapath_core.api import build

        p = self.p = params
        self.encoder = build(
            "slide_encoder", p.slide_encoder, weights=p.slide_encoder_weights, **p.slide_encoder_params
        )
        self.slide_encoder_name = p.slide_encoder
        in_dim = int(self.encoder.in_dim)
        enc_dim = int(getattr(self.encoder, "embed_dim", in_dim))
        self.in_dim = in_dim
        self.enc_to_dec = nn.Linear(enc_dim, p.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p.decoder_dim))
        self.decoder = LightDecoder(p.decoder_dim, p.decoder_depth, p.decoder_heads, p.tile_size)
        self.head = nn.Linear(p.decoder_dim, in_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------------------------------ protocol
    def view(self, sample: dict, rng: np.random.Generator) -> dict:
        """``{"features": (N, Din), "coords": (N, 2)}`` -> augmented, subsampled and masked view:
        ``{"features": (M, Din) float32, "coords": (M, 2) float32, "mask": (M,) bool}``."""
        p = self.p
        keep, coords = augment_slide(
            sample["coords"],
            rng,
            crop_ratio=p.crop_ratio,
            flip_p=p.flip_p,
            shift=p.random_shift,
            tile_size=p.tile_size,
            n_cells=p.n_cells,
        )
        sub = subsample(len(keep), p.max_tiles, rng)
        feats = np.asarray(sample["features"], dtype=np.float32)[keep[sub]]
        return {
            "features": torch.from_numpy(feats),
            "coords": torch.from_numpy(coords[sub]),
            "mask": torch.from_numpy(random_mask(len(sub), p.mask_ratio, rng)),
        }

    def collate(self, views: list[dict]) -> dict:
        return pad_slides(views, ("features", "coords", "mask"))

    # ------------------------------------------------------------------------------------------ loss
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Batch (features (B, N, Din), coords (B, N, 2), padding_mask (B, N), mask (B, N)) ->
        {"loss": MSE on masked tiles, "n_masked": count}."""
        dev = self.mask_token.device
        x = batch["features"].to(dev).float()
        c = batch["coords"].to(dev).float()
        pad = batch["padding_mask"].to(dev)
        mask = batch["mask"].to(dev) & ~pad
        hidden = mask | pad
        order = torch.sort(hidden.to(torch.uint8), dim=1, stable=True).indices  # visible first, in order
        n_vis = (~hidden).sum(1)
        nv = max(int(n_vis.max()), 1)
        vis_idx = order[:, :nv]
        vis_pad = torch.arange(nv, device=dev)[None, :] >= n_vis[:, None]
        x_vis = torch.gather(x, 1, vis_idx[..., None].expand(-1, -1, x.shape[-1]))
        c_vis = torch.gather(c, 1, vis_idx[..., None].expand(-1, -1, 2))
        _, tokens = self.encoder(
            x_vis, c_vis, padding_mask=vis_pad if bool(vis_pad.any()) else None, return_tile_tokens=True
        )
        dec = self.enc_to_dec(tokens.float()) * (~vis_pad)[..., None]
        scattered = torch.zeros(x.shape[0], x.shape[1], dec.shape[-1], device=dev, dtype=dec.dtype)
        scattered = scattered.scatter(1, vis_idx[..., None].expand_as(dec), dec)
        full = torch.where(hidden[..., None], self.mask_token.to(dec.dtype), scattered)
        pred = self.head(self.decoder(full, c, pad if bool(pad.any()) else None))
        target = x
        if self.p.norm_target:
            target = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
        err = ((pred.float() - target) ** 2).mean(-1)
        n = mask.sum()
        loss = (err * mask).sum() / n.clamp_min(1)
        return {"loss": loss, "n_masked": n.float()}

    def slide_encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained encoder's weights (its plugin's own layout), for the slide encoder's ``weights:``."""
        return {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}


@hookimpl
def gigapath_ssl_objectives():
    return [SlideMAE]
