"""HIPT's ViT-256: a DINO ViT-S/16 on 256x256 tiles, 384-d CLS embedding (Xu et al. 2024, Methods: competing methods
baseline).

Chen et al., "Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised Learning",
CVPR 2022; code and weights: github.com/mahmoodlab/HIPT (``HIPT_4K/Checkpoints/vit256_small_dino.pth``).

Architecture: ViT-S/16 (embed 384, depth 12, 6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6) with a
position table for 224 px (1 + 14x14 rows). As in DINO, a 256-px tile (16x16 patches) gets that table
resized on the fly by bicubic interpolation with scale factor (16 + 0.1) / 14: :func:`dino_pos_embed`
reproduces it, so the released weights give the released features. Output: the CLS token after the final
norm (384-d). Built on timm's VisionTransformer, whose key layout is the checkpoint's.

Published input transform (HIPT ``eval_transforms``): ToTensor -> Normalize(mean 0.5, std 0.5), no resize.

Weights: the released file is a DINO training checkpoint ``{"teacher": ..., "student": ..., "args":
Namespace, ...}``; the teacher is used, ``module.``/``backbone.`` prefixes are removed and the DINO projection
head (``head.*``, a training-only MLP) is left out (logged). Any other difference is an error.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams
from gigapath_core.weights import load_state_dict_strict, strip_prefixes

from ._common import HALF, ModelTileEncoder, TileTransform, log_dropped

DINO_PREFIXES = ("module.", "backbone.")


def dino_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """DINO's on-the-fly resize of a ViT position table (CLS row first) to a ``rows`` x ``cols`` patch grid.

    Args:
        pos_embed: (1, 1 + n*n, D) table trained on an n x n grid.
    Returns:
        (1, 1 + rows*cols, D): unchanged when the grid is already n x n, else the patch rows resized by
        ``F.interpolate(mode="bicubic", scale_factor=((rows + 0.1) / n, (cols + 0.1) / n))`` (the 0.1 is
        DINO's guard against floating-point rounding of the output size), in row-major order.
    """
    n_tab = pos_embed.shape[1] - 1
    n = int(math.isqrt(n_tab))
    if rows * cols == n_tab and rows == cols:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic")
    if tuple(grid.shape[-2:]) != (rows, cols):  # pragma: no cover - guarded by the +0.1
        raise RuntimeError(f"position table resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def drop_dino_head(plugin: str, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """DINO checkpoint (teacher/student branch) -> backbone state dict: strip ``module.``/``backbone.``, leave
    out the projection head ``head.*`` (logged by name)."""
    sd = strip_prefixes(state_dict, DINO_PREFIXES)
    head = [k for k in sd if k.startswith("head.")]
    log_dropped(plugin, source, head, "DINO projection head, training only")
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


@functools.cache
def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    class DinoViT(VisionTransformer):
        """timm ViT whose position table stays at its trained grid and is resized per input like DINO's
        ``interpolate_pos_encoding`` (:func:`dino_pos_embed`); any input side that is a multiple of the patch."""

        def __init__(self, **kwargs):
            super().__init__(dynamic_img_size=True, **kwargs)

        def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, rows, cols, D) -> (B, 1 + rows*cols, D)
            b, rows, cols, dim = x.shape
            x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, rows * cols, dim)], dim=1)
            return self.pos_drop(x + dino_pos_embed(self.pos_embed, rows, cols))

    return DinoViT


def DinoViT(**kwargs):
    """A ViT (timm layout) with DINO-style position-table resizing; kwargs as timm's VisionTransformer."""
    return _vit_class()(**kwargs)


class HIPTViT256(ModelTileEncoder):
    """HIPT ViT-256 (DINO ViT-S/16 on 256-px tiles, 384-d; Chen et al. 2022) tile encoder.

    transform: (H, W, 3) uint8 RGB -> (3, img_size, img_size) float32 in [-1, 1] (a no-op resize for 256-px tiles).
    forward: (B, 3, H, W) float32, H and W multiples of 16 -> (B, 384) float32 CLS embeddings.
    """

    name = "hipt"
    channels_last = False

    class Params(PluginParams):
        img_size: int = Field(256, ge=16, multiple_of=16, description="model input side, px (published: 256)")
        mean: tuple[float, float, float] = HALF
        std: tuple[float, float, float] = HALF

    def __init__(self, img_size: int = 256, mean=HALF, std=HALF):
        super().__init__()
        self.model = DinoViT(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0,
                             qkv_bias=True, num_classes=0)
        self.embed_dim = int(self.model.num_features)
        self.img_size = img_size
        self.tile_transform = TileTransform(img_size, img_size, mean, std)  # resize/crop: no-ops on 256-px tiles

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load ``vit256_small_dino.pth`` (teacher, DINO layout) or a plain timm/own ViT-S/16 state dict.

        Raises:
            WeightsError: missing/unexpected keys (by name) or shape mismatches.
        """
        sd = drop_dino_head(self.name, strip_prefixes(state_dict, ("model.",)), source)
        load_state_dict_strict(self.model, sd, source)
        self.weights_source = source


@hookimpl
def gigapath_tile_encoders():
    return [HIPTViT256]
