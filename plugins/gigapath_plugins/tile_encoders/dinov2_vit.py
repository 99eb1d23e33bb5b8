"""DINOv2-style ViT tile encoders on timm: the Prov-GigaPath ViT-g/14 and any other timm ViT (Xu et al. 2024, Methods:
tile encoder).

The ``prov-gigapath`` preset is timm ``vit_giant_patch14_dinov2`` built with ``img_size=224, patch_size=16,
embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334, init_values=1e-5, num_classes=0``: 1,134,953,984
parameters, output the 1,536-d CLS token. Input transform (Xu et al. 2024, Methods: tile encoder): Resize(256,
bicubic) -> CenterCrop(224)
-> ToTensor -> Normalize(ImageNet mean/std).

Embedding rule (``embedding``): ``cls`` (the final-norm CLS token, timm ``global_pool="token"``) or ``cls_mean``:
the CLS token concatenated with the mean of the patch tokens, register tokens excluded (width 2 x D), as Virchow
/ Virchow2 / H0-mini publish it (paige-ai/Virchow model card; TRIDENT ``trident/patch_encoder_models/load.py``,
``Virchow2InferenceEncoder.forward``: ``output[:, 5:]`` skips the CLS token and 4 registers).

``model_kwargs`` are timm ``create_model`` kwargs as YAML values; ``mlp_layer`` may name a timm.layers MLP class
(``SwiGLUPacked``, ``SwiGLU``, ``GluMlp``, ``Mlp``) and ``act_layer`` a timm activation name (``silu``, ``gelu``),
so the SwiGLU ViTs of UNI2-h / Virchow are written without code (their model cards pass the classes).

Weights: timm's key layout (``blocks.0.attn.qkv.weight``..., as in the ``prov-gigapath/prov-gigapath`` hub
checkpoint) or this plugin's own (``model.``-prefixed, from ``state_dict()``). timm's ViT checkpoint filter
converts the original facebookresearch DINOv2 layout and resamples ``pos_embed`` when the checkpoint was
trained at another image size (logged); a different patch size or any missing/unexpected key is an error.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field

from gigapath_core import hookimpl
from gigapath_core.errors import ConfigError, WeightsError
from gigapath_core.kinds import PluginParams
from gigapath_core.weights import load_state_dict_strict, strip_prefixes

from ._common import IMAGENET_MEAN, IMAGENET_STD, ModelTileEncoder, TileTransform, create_timm_model, log_dropped

log = logging.getLogger("gigapath")


class DinoV2ViT(ModelTileEncoder):
    """timm ViT (DINOv2 family, Prov-GigaPath ViT-g/14) tile encoder; CLS-token embedding.

    transform: (H, W, 3) uint8 RGB -> (3, img_size, img_size) float32 (Resize -> CenterCrop -> Normalize).
    forward: (B, 3, img_size, img_size) float32 -> (B, embed_dim) float32 CLS embeddings.
    """

    name = "dinov2_vit"
    channels_last = False  # ViTs gain nothing from channels-last inputs

    class Params(PluginParams):
        model_name: str = Field("vit_small_patch14_dinov2", description="timm architecture name")
        model_kwargs: dict[str, Any] = Field(default_factory=dict, description="timm create_model kwargs")
        img_size: int = Field(224, ge=14, description="model input side after the centre crop, px")
        resize: int = Field(256, ge=14, description="resize the shorter side to this before the crop, px")
        interpolation: Literal["bicubic", "bilinear"] = "bicubic"
        mean: tuple[float, float, float] = IMAGENET_MEAN
        std: tuple[float, float, float] = IMAGENET_STD
        embedding: Literal["cls", "cls_mean"] = Field(
            "cls", description="cls: CLS token; cls_mean: CLS token ⊕ mean of the patch tokens (registers excluded)")

    def __init__(self, model_name: str = "vit_small_patch14_dinov2", model_kwargs: dict | None = None,
                 img_size: int = 224, resize: int = 256, interpolation: str = "bicubic",
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding: str = "cls"):
        super().__init__()
        self.model_name = model_name
        self.model_args = {"img_size": img_size, "num_classes": 0, **(model_kwargs or {})}
        self.embedding = embedding
        create = resolve_layers(self.model_args)
        if embedding == "cls_mean":
            create.setdefault("global_pool", "")  # every token out; ClsMeanPool pools them
        made = create_timm_model(model_name, **create)
        self.model = made if embedding == "cls" else ClsMeanPool(made)
        width = int(made.num_features)
        self.embed_dim = width if embedding == "cls" else 2 * width
        self.mean, self.std = tuple(mean), tuple(std)
        self.tile_transform = TileTransform(resize, img_size, mean, std, interpolation)

    @property
    def vit(self) -> torch.nn.Module:
        """The timm model itself (inside the CLS ⊕ mean wrapper for ``embedding: cls_mean``)."""
        return self.model.vit if isinstance(self.model, ClsMeanPool) else self.model

    # ------------------------------------------------------------------------------------------ weights
    def check_config(self, config: dict, source: str) -> None:
        """Refuse weights whose ``config.json`` describes another architecture (named in the error).

        Raises:
            WeightsError: a transformers (not timm) folder, another timm architecture, or ``model_args``
                that differ from this model's (the message gives the params to use instead).
        """
        if "architecture" not in config:
            kind = config.get("model_type") or ", ".join(config.get("architectures", [])) or "unknown"
            raise WeightsError(f"weights {source}: config.json describes a Hugging Face transformers model "
                               f"({kind}), not a timm one; {self.name} takes timm-layout weights (use the "
                               f"model's timm/ release, or convert the keys)")
        arch = str(config["architecture"]).split(".")[0]
        theirs = dict(config.get("model_args") or {})
        theirs.setdefault("num_classes", config.get("num_classes", 0))
        differ = {k: (v, self.model_args[k]) for k, v in theirs.items()  # img_size: pos_embed is resampled
                  if k in self.model_args and k not in NOT_IN_WEIGHTS and not _same(v, self.model_args[k], k)}
        if arch != self.model_name.split(".")[0] or differ:
            details = "; ".join(f"{k}: weights {a!r} vs model {b!r}" for k, (a, b) in differ.items())
            suggested = {k: v for k, v in theirs.items() if k not in NOT_IN_WEIGHTS + ("num_classes",)}
            raise WeightsError(
                f"weights {source} were saved from timm {arch!r} ({details or 'model_args ' + str(theirs)}) but "
                f"this tile encoder is {self.model_name!r} with {self.model_args}; set params model_name: {arch} "
                f"and model_kwargs: {suggested}")
        cfg = config.get("pretrained_cfg") or {}
        for key, ours in (("mean", self.mean), ("std", self.std)):
            if key in cfg and not _same(list(cfg[key]), list(ours)):
                log.warning("%s: weights %s were trained with %s=%s but the transform uses %s", self.name, source,
                            key, cfg[key], ours)

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load timm-layout (or ``model.``-prefixed) weights strictly; see the module docstring.

        Raises:
            WeightsError: missing/unexpected keys by name, a shape mismatch, or another patch size.
        """
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        if state_dict and all(k.startswith("model.") for k in state_dict):
            state_dict = strip_prefixes(state_dict, ("model.vit.", "model."))
        vit = self.vit
        if isinstance(vit, VisionTransformer):
            pe = state_dict.get("patch_embed.proj.weight")
            own = vit.patch_embed.proj.weight
            if pe is not None and pe.ndim == 4 and tuple(pe.shape[-2:]) != tuple(own.shape[-2:]):
                raise WeightsError(f"weights {source} have patch size {tuple(pe.shape[-2:])} but the model has "
                                   f"{tuple(own.shape[-2:])}: set model_kwargs.patch_size to match the checkpoint")
            before = state_dict
            pos = state_dict.get("pos_embed")
            state_dict = checkpoint_filter_fn(state_dict, vit)
            if pos is not None and "pos_embed" in state_dict and pos.shape != state_dict["pos_embed"].shape:
                log.info("%s: %s: pos_embed resampled from %s to %s for img_size %s", self.name, source,
                         tuple(pos.shape), tuple(state_dict["pos_embed"].shape), self.model_args["img_size"])
            log_dropped(self.name, source, [k for k in before if k in ("mask_token",) and k not in state_dict],
                        "DINOv2 training-only tokens")
        load_state_dict_strict(vit, state_dict, source)
        self.weights_source = source


#: timm model_args that change no tensor of the checkpoint (img_size: pos_embed is resampled on load)
NOT_IN_WEIGHTS = ("img_size", "global_pool", "dynamic_img_size")

#: timm.layers MLP classes a preset may name in ``model_kwargs.mlp_layer``
MLP_LAYERS = ("SwiGLUPacked", "SwiGLU", "GluMlp", "Mlp")


def resolve_layers(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``model_kwargs`` with ``mlp_layer: SwiGLUPacked`` (a name) replaced by the timm.layers class.

    Raises:
        ConfigError: an ``mlp_layer`` name outside :data:`MLP_LAYERS`.
    """
    import timm.layers

    out = dict(kwargs)
    name = out.get("mlp_layer")
    if isinstance(name, str):
        if name not in MLP_LAYERS:
            raise ConfigError("tile_encoder.params.model_kwargs.mlp_layer",
                              f"{name!r} is not one of {', '.join(MLP_LAYERS)}")
        out["mlp_layer"] = getattr(timm.layers, name)
    return out


class ClsMeanPool(torch.nn.Module):
    """(B, 3, H, W) -> (B, 2D): a timm ViT's final-norm CLS token ⊕ mean of its patch tokens.

    The ViT is built with ``global_pool=""`` so ``forward`` returns all tokens (B, T, D); the first
    ``num_prefix_tokens`` (CLS, then registers) are left out of the mean, as Virchow2's model card does.
    """

    def __init__(self, vit: torch.nn.Module):
        super().__init__()
        if getattr(vit, "global_pool", "") not in ("", None):
            raise ConfigError("tile_encoder.params.model_kwargs.global_pool",
                              "embedding: cls_mean needs global_pool: '' (the model must return every token)")
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(images)
        return torch.cat([tokens[:, 0], tokens[:, self.vit.num_prefix_tokens:].mean(1)], dim=-1)


def _layer_name(v: Any) -> Any:
    """``timm.layers.mlp.SwiGLUPacked`` / ``SwiGLUPacked`` / ``torch.nn.SiLU`` / ``silu`` -> a comparable name."""
    return str(v).rsplit(".", 1)[-1].strip("<>'").lower() if v is not None else v


def _same(a: Any, b: Any, key: str = "") -> bool:
    if key in ("mlp_layer", "act_layer"):  # a config.json names the class; a preset names it too, maybe shorter
        return _layer_name(a) == _layer_name(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)))
    return a == b


@hookimpl
def gigapath_tile_encoders():
    return [DinoV2ViT]
