"""REMEDIS: a BiT ResNet-152x2 trunk (ResNet-v2, GroupNorm + weight standardisation), 4,096-d (Xu et al. 2024,
Methods: competing methods).

Azizi et al., "Robust and efficient medical imaging with self-supervision", Nature Biomedical Engineering 7
(2023): BiT-M supervised pretraining on ImageNet-21k, then SimCLR on unlabelled pathology tiles (Xu et al. 2024,
Methods: competing methods:
50 M TCGA tiles). The architecture is timm ``resnetv2_152x2_bit`` without its classifier: global average
pooling of the last stage gives 2 x 2,048 = 4,096-d (232,238,208 parameters).

Input transform: Resize(224) -> ToTensor, values in [0, 1] with no mean/std normalisation (the TensorFlow /
SimCLR convention of the released models; set ``mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]`` for timm's
ImageNet BiT weights, which take [-1, 1]).

Weights: a timm-layout state dict (``stem.conv.weight``, ``stages.0.blocks.0.conv1.weight``...), or BiT's
published variable naming (``resnet/root_block/standardized_conv2d/kernel``, ``resnet/block1/unit01/a/...``,
HWIO kernels) as in Google's BiT ``.npz`` files; the classifier (``head/...``) is left out (logged). The
REMEDIS release itself is TensorFlow (PhysioNet, credentialed access): export its variables to ``.npz`` with
BiT's names (or to a timm state dict) first; see docs/tile_encoders.md.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams
from gigapath_core.weights import load_state_dict_strict, strip_prefixes

from ._common import ModelTileEncoder, TileTransform, create_timm_model, log_dropped

ZERO = (0.0, 0.0, 0.0)
ONE = (1.0, 1.0, 1.0)
_UNIT = re.compile(r"block(\d+)/unit(\d+)/([abc])/(?:(proj)/)?(standardized_conv2d/kernel|group_norm/(gamma|beta))$")


def bit_to_timm(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """BiT variable names (``<prefix>root_block/...``) -> timm ResNetV2 keys; returns (converted, left out).

    Conv kernels go from TensorFlow's HWIO to PyTorch's OIHW; GroupNorm ``gamma``/``beta`` become
    ``weight``/``bias``. Keys under ``<prefix>head/`` (the classifier) are returned as left out.
    """
    root = next(k for k in state_dict if k.endswith("root_block/standardized_conv2d/kernel"))
    prefix = root[: -len("root_block/standardized_conv2d/kernel")]
    out, left = {}, []

    def conv(v: torch.Tensor) -> torch.Tensor:
        return v.permute(3, 2, 0, 1).contiguous() if v.ndim == 4 else v

    for key, v in state_dict.items():
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name == "root_block/standardized_conv2d/kernel":
            out["stem.conv.weight"] = conv(v)
        elif name in ("group_norm/gamma", "group_norm/beta"):
            out["norm." + ("weight" if name.endswith("gamma") else "bias")] = v
        elif (m := _UNIT.match(name)) is not None:
            stage, unit, part, proj = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3), m.group(4)
            base = f"stages.{stage}.blocks.{unit}."
            idx = "abc".index(part) + 1
            if proj:
                out[base + "downsample.conv.weight"] = conv(v)
            elif m.group(6):
                out[base + f"norm{idx}." + ("weight" if m.group(6) == "gamma" else "bias")] = v
            else:
                out[base + f"conv{idx}.weight"] = conv(v)
        else:
            left.append(key)
    return out, left


class REMEDIS(ModelTileEncoder):
    """REMEDIS (BiT ResNet-152x2 trunk, 4,096-d; Azizi et al. 2023) tile encoder.

    transform: (H, W, 3) uint8 RGB -> (3, img_size, img_size) float32 in [0, 1] (by default).
    forward: (B, 3, H, W) float32 -> (B, 4096) float32 (global average pool of the last stage).
    """

    name = "remedis"
    channels_last = True  # CNN: 1.17x faster channels-last here (CPU, batch 4, after warm-up; docs/tile_encoders.md)

    class Params(PluginParams):
        model_name: str = Field("resnetv2_152x2_bit", description="timm BiT architecture (REMEDIS: 152x2)")
        img_size: int = Field(224, ge=32, description="model input side, px")
        interpolation: Literal["bilinear", "bicubic"] = "bilinear"
        mean: tuple[float, float, float] = ZERO
        std: tuple[float, float, float] = ONE

    def __init__(self, model_name: str = "resnetv2_152x2_bit", img_size: int = 224, interpolation: str = "bilinear",
                 mean=ZERO, std=ONE):
        super().__init__()
        self.model = create_timm_model(model_name, num_classes=0)
        self.embed_dim = int(self.model.num_features)
        self.tile_transform = TileTransform(img_size, img_size, mean, std, interpolation)

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a timm-layout or BiT-named state dict strictly (classifier left out, logged).

        Raises:
            WeightsError: missing/unexpected keys (by name) or shape mismatches.
        """
        raw = strip_prefixes(state_dict, ("module.", "model."))
        sd = raw
        if any(k.endswith("root_block/standardized_conv2d/kernel") for k in raw):
            sd, left = bit_to_timm(raw)
            head = [k for k in left if "head/" in k]
            log_dropped(self.name, source, head, "classifier")
            sd.update({k: raw[k] for k in left if k not in head})  # anything else: reported as unexpected
        else:
            head = [k for k in sd if k.startswith("head.fc.")]
            log_dropped(self.name, source, head, "classifier")
            sd = {k: v for k, v in sd.items() if k not in head}
        load_state_dict_strict(self.model, sd, source)
        self.weights_source = source


@hookimpl
def gigapath_tile_encoders():
    return [REMEDIS]
