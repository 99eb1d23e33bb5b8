"""CTransPath: a convolutional stem + Swin Transformer (tiny) tile encoder, 768-d (Xu et al. 2024, Methods: competing
methods baseline).

Wang et al., "Transformer-based unsupervised contrastive learning for histopathological image
classification", Medical Image Analysis 81 (2022); code and weights: github.com/Xiyue-Wang/TransPath.

Architecture: timm ``swin_tiny_patch4_window7_224`` (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7)
whose 4x4 patch embedding is replaced by a convolutional stem: Conv3x3/2 (3->12, no bias) -> BN -> ReLU ->
Conv3x3/2 (12->24, no bias) -> BN -> ReLU -> Conv1x1 (24->96) -> LayerNorm(96). Output: mean of the final
LayerNorm'ed tokens, 768-d (the released model is used with ``head = Identity``).

Published input transform (TransPath ``get_features_CTransPath.py``): Resize(224) (bilinear) -> ToTensor ->
Normalize(ImageNet mean/std).

Weights: the released ``ctranspath.pth`` is ``{"model": state_dict}`` saved from a modified timm 0.5.4. Its
layout differs from current timm in two ways, converted by timm's own Swin checkpoint filter: each stage's
patch-merging layer sits at the end of stage i there (``layers.i.downsample``) and at the start of stage
i+1 here (``layers.{i+1}.downsample``); and the derived buffers ``relative_position_index`` and
``attn_mask`` are stored there but rebuilt here (left out, logged). Any other difference is an error that
names the keys.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams
from gigapath_core.weights import load_state_dict_strict, strip_prefixes

from ._common import IMAGENET_MEAN, IMAGENET_STD, ModelTileEncoder, TileTransform, create_timm_model, log_dropped

DERIVED_BUFFERS = ("relative_position_index", "attn_mask")


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3x3 conv/BN/ReLU stages and a 1x1 conv, then a norm.

    Takes (B, 3, H, W) float32, returns (B, H/4, W/4, embed_dim) (timm's Swin wants NHWC tokens). The
    constructor accepts the keyword arguments timm's SwinTransformer passes to its ``embed_layer``.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None,
                 strict_img_size=True, output_fmt="NHWC", **_ignored):
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch_size 4 and embed_dim divisible by 8")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        c1, c2 = embed_dim // 8, embed_dim // 4
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, c1, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Conv2d(c2, embed_dim, 1),
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def set_input_size(self, img_size=None, patch_size=None) -> None:  # called by timm's set_input_size
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.img_size, self.grid_size = size, (size[0] // 4, size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} px does not match the model's {self.img_size} px")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class CTransPath(ModelTileEncoder):
    """CTransPath (conv stem + Swin-T, 768-d; Wang et al. 2022) tile encoder.

    transform: (H, W, 3) uint8 RGB -> (3, img_size, img_size) float32 (Resize -> Normalize, ImageNet).
    forward: (B, 3, img_size, img_size) float32 -> (B, 768) float32 (mean of the final tokens).
    """

    name = "ctranspath"
    channels_last = True  # convolutional stem: 1.04x faster channels-last here (CPU, batch 16; docs/tile_encoders.md)

    class Params(PluginParams):
        img_size: int = Field(224, ge=32, multiple_of=32, description="model input side, px")
        resize: int = Field(224, ge=32, description="resize the shorter side to this (published: 224), px")
        interpolation: Literal["bilinear", "bicubic"] = Field("bilinear", description="resize filter (published)")
        mean: tuple[float, float, float] = IMAGENET_MEAN
        std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, img_size: int = 224, resize: int = 224, interpolation: str = "bilinear",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = create_timm_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, num_classes=0,
                                       img_size=img_size)
        self.embed_dim = int(self.model.num_features)
        crop = img_size if resize != img_size else None
        self.tile_transform = TileTransform(resize, crop, mean, std, interpolation)

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load the released ``ctranspath.pth`` layout (timm 0.5.4) or the current timm layout, strictly.

        Raises:
            WeightsError: missing/unexpected keys (by name) or shape mismatches after the conversion.
        """
        from timm.models.swin_transformer import checkpoint_filter_fn

        sd = strip_prefixes(state_dict, ("module.", "model."))
        derived = [k for k in sd if k.rsplit(".", 1)[-1] in DERIVED_BUFFERS]
        converted = checkpoint_filter_fn(sd, self.model)
        log_dropped(self.name, source, derived, "buffers rebuilt from the window size")
        load_state_dict_strict(self.model, converted, source)
        self.weights_source = source


@hookimpl
def gigapath_tile_encoders():
    return [CTransPath]
