"""DINOv2-style ViT tile encoders on timm: the Prov-GigaPath ViT-g/14 and smaller ViTs (SPEC §2).

Any timm ViT by ``model_name`` + ``model_kwargs``; output is the CLS token (``num_classes=0``).
Input transform (Prov-GigaPath): Resize(256, bicubic) -> CenterCrop(224) -> ToTensor -> Normalize(ImageNet).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, TileEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2ViT(TileEncoder):
    """timm ViT (DINOv2 family) tile encoder; CLS-token embedding."""

    name = "dinov2_vit"

    class Params(PluginParams):
        model_name: str = Field("vit_small_patch14_dinov2", description="timm architecture name")
        model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm create_model kwargs")
        img_size: int = Field(224, ge=14, description="model input side after centre crop, px")
        resize: int = Field(256, ge=14, description="resize shorter side to this before the crop, px")
        interpolation: Literal["bicubic", "bilinear"] = "bicubic"
        mean: tuple[float, float, float] = IMAGENET_MEAN
        std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, model_name="vit_small_patch14_dinov2", model_kwargs=None, img_size=224, resize=256,
                 interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        import timm
        from torchvision import transforms as T

        kwargs = {"img_size": img_size, "num_classes": 0, **(model_kwargs or {})}
        self.model = timm.create_model(model_name, pretrained=False, **kwargs)
        self.embed_dim = int(self.model.num_features)
        mode = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
        self._transform = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(img_size), T.ToTensor(),
                                     T.Normalize(mean, std)])

    def transform(self, tile: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, img_size, img_size) float32."""
        from PIL import Image

        return self._transform(Image.fromarray(tile))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, img_size, img_size) float32 -> (B, embed_dim) float32 CLS embeddings."""
        return self.model(images)

    def load_weights(self, state_dict, source):
        """Accept timm-layout keys (``blocks.0...``, as in the Prov-GigaPath hub checkpoint) or ours."""
        if not any(k.startswith("model.") for k in state_dict):
            state_dict = {f"model.{k}": v for k, v in state_dict.items()}
        super().load_weights(state_dict, source)


@hookimpl
def gigapath_tile_encoders():
    return [DinoV2ViT]
