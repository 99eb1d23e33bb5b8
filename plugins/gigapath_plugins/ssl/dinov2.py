"""DINOv2 self-supervised pretraining of a tile encoder (Xu et al. 2024, Methods: tile encoder; Oquab et al., TMLR
2024, §4).

Student and teacher are copies of a timm ViT taken from a ``tile_encoder`` plugin (``dinov2_vit`` by
default; any preset of it, e.g. ``dinov2-vits14`` or ``prov-gigapath``) plus a DINO head (and optionally a
separate iBOT head). The teacher is an exponential moving average of the student (momentum raised from
``teacher_momentum`` to ``final_teacher_momentum`` on a cosine schedule) and sees only the two global crops;
the student sees every crop, with iBOT masks on the global ones. Loss =
``dino_weight * DINO + ibot_weight * iBOT + koleo_weight * KoLeo`` (see :mod:`.dinov2_losses`).

Data view (``data = "tiles"``): one (H, W, 3) uint8 tile -> multi-crop + masks (:mod:`.dinov2_views`).
After training, :meth:`DINOv2Objective.tile_encoder_state_dict` gives the teacher backbone in timm layout,
loadable as ``weights:`` of the same tile encoder.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, SSLObjective
from gigapath_core.training import ema_update

from .dinov2_losses import DINOHead, TeacherTargets, dino_loss, ibot_patch_loss, koleo_loss
from .dinov2_views import MultiCropConfig, collate_multicrop, multicrop_view


class MaskedViT(nn.Module):
    """A timm VisionTransformer with a learnable iBOT mask token replacing masked patch embeddings.

    ``forward(images (B, 3, h, w), masks (B, P) bool | None) -> (cls (B, D), patch tokens (B, P, D))``;
    crops of any size multiple of the patch size (needs the ViT built with ``dynamic_img_size=True``).
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(1, vit.embed_dim))

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.vit
        x = v.patch_embed(images)  # (B, h', w', D) with dynamic_img_size, else (B, P, D)
        if masks is not None:
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            flat = torch.where(masks.reshape(flat.shape[0], -1, 1), self.mask_token.to(flat.dtype), flat)
            x = flat.reshape(x.shape)
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))
        x = v.norm(v.blocks(x))
        return x[:, 0], x[:, v.num_prefix_tokens :]


def _local_size(patch: int) -> int:
    """The multiple of the patch size in the 96–98 px local-crop range (98 for /14, 96 for /16)."""
    return max(patch, int(round(97 / patch)) * patch)


class DINOv2Objective(SSLObjective):
    """DINOv2 (DINO + iBOT + KoLeo) with an EMA teacher on tiles; trains a timm ViT tile encoder."""

    name = "dinov2"
    data = "tiles"

    class Params(PluginParams):
        tile_encoder: str = Field("dinov2_vit", description="tile_encoder plugin or preset giving the ViT")
        tile_encoder_params: dict[str, Any] = Field(default_factory=dict, description="its parameter overrides")
        tile_encoder_weights: str | list[str] | None = Field("random", description="student initialisation")
        drop_path_rate: float = Field(0.0, ge=0, lt=1, description="student stochastic depth")
        n_local_crops: int = Field(8, ge=0)
        global_size: int = Field(224, ge=28)
        local_size: int | None = Field(None, ge=14, description="default: 98 for patch 14, 96 for patch 16")
        global_scale: tuple[float, float] = (0.32, 1.0)
        local_scale: tuple[float, float] = (0.05, 0.32)
        prototypes: int = Field(65536, ge=2, description="DINO head output width K")
        ibot_separate_head: bool = False
        ibot_prototypes: int | None = Field(None, ge=2, description="iBOT head width (separate head only)")
        head_hidden_dim: int = Field(2048, ge=1)
        head_bottleneck_dim: int = Field(256, ge=1)
        head_layers: int = Field(3, ge=1)
        centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
        center_momentum: float = Field(0.9, ge=0, lt=1)
        student_temp: float = Field(0.1, gt=0)
        teacher_temp: float = Field(0.07, gt=0)
        warmup_teacher_temp: float = Field(0.04, gt=0)
        warmup_teacher_temp_steps: int = Field(0, ge=0)
        teacher_momentum: float = Field(0.992, ge=0, le=1)
        final_teacher_momentum: float = Field(1.0, ge=0, le=1)
        dino_weight: float = Field(1.0, ge=0)
        ibot_weight: float = Field(1.0, ge=0)
        koleo_weight: float = Field(0.1, ge=0)
        mask_probability: float = Field(0.5, ge=0, le=1)
        mask_ratio: tuple[float, float] = (0.1, 0.5)

    @classmethod
    def from_params(cls, params):
        return cls(params)

    def __init__(self, params: "DINOv2Objective.Params"):
        super().__init__()
        from gigapath_core.api import build, resolve

        p = self.p = params
        _, card = resolve("tile_encoder", p.tile_encoder)
        base_kwargs = dict((card.params if card else {}).get("model_kwargs", {}))
        model_kwargs = {
            **base_kwargs,
            **p.tile_encoder_params.get("model_kwargs", {}),
            "dynamic_img_size": True,
            "drop_path_rate": p.drop_path_rate,
        }
        enc = build(
            "tile_encoder",
            p.tile_encoder,
            weights=p.tile_encoder_weights,
            **{**p.tile_encoder_params, "model_kwargs": model_kwargs},
        )
        vit = getattr(enc, "model", None)
        if vit is None or not hasattr(vit, "patch_embed") or not hasattr(vit, "blocks"):
            raise TypeError(f"ssl_objective dinov2: tile encoder {p.tile_encoder!r} does not wrap a timm ViT (.model)")
        self.tile_encoder_name = p.tile_encoder
        self.init_weights_source = enc.weights_source
        embed_dim = int(vit.embed_dim)
        patch = int(vit.patch_embed.patch_size[0])
        self.views = MultiCropConfig(
            global_size=p.global_size,
            local_size=p.local_size or _local_size(patch),
            n_local=p.n_local_crops,
            global_scale=p.global_scale,
            local_scale=p.local_scale,
            patch_size=patch,
            mask_probability=p.mask_probability if p.ibot_weight > 0 else 0.0,
            mask_ratio=p.mask_ratio,
        )
        head = dict(hidden_dim=p.head_hidden_dim, bottleneck_dim=p.head_bottleneck_dim, n_layers=p.head_layers)
        student = {"backbone": MaskedViT(vit), "dino_head": DINOHead(embed_dim, p.prototypes, **head)}
        ibot_k = p.prototypes
        if p.ibot_separate_head:
            ibot_k = p.ibot_prototypes or p.prototypes
            student["ibot_head"] = DINOHead(embed_dim, ibot_k, **head)
        self.student = nn.ModuleDict(student)
        self.teacher = copy.deepcopy(self.student)
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.dino_targets = TeacherTargets(p.prototypes, p.centering, p.center_momentum)
        self.ibot_targets = TeacherTargets(ibot_k, p.centering, p.center_momentum)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------------------------------ protocol
    def view(self, sample: np.ndarray, rng: np.random.Generator) -> dict:
        """(H, W, 3) uint8 tile -> multi-crop views + iBOT masks."""
        return multicrop_view(sample, self.views, rng)

    def collate(self, views: list[dict]) -> dict:
        return collate_multicrop(views)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher
        return self

    def teacher_temperature(self) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` over the warm-up steps."""
        p, s = self.p, int(self.step)
        if p.warmup_teacher_temp_steps and s < p.warmup_teacher_temp_steps:
            return p.warmup_teacher_temp + (p.teacher_temp - p.warmup_teacher_temp) * s / p.warmup_teacher_temp_steps
        return p.teacher_temp

    def teacher_momentum(self, step: int, total_steps: int) -> float:
        """Cosine increase of the EMA momentum from ``teacher_momentum`` to ``final_teacher_momentum``."""
        p = self.p
        t = min(1.0, step / max(1, total_steps))
        return (
            p.final_teacher_momentum - (p.final_teacher_momentum - p.teacher_momentum) * (math.cos(math.pi * t) + 1) / 2
        )

    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher from the student."""
        ema_update(self.teacher, self.student, self.teacher_momentum(step, total_steps))
        self.step.fill_(step)

    # ------------------------------------------------------------------------------------------ loss
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch from :meth:`collate` -> {"loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy"}."""
        p = self.p
        dev = self.step.device
        glob = batch["global"].to(dev, non_blocking=True)
        masks = batch["masks"].to(dev).flatten(1)
        n_glob = glob.shape[0]
        use_ibot = p.ibot_weight > 0 and bool(masks.any())
        temp = self.teacher_temperature()
        t_ibot_head = self.teacher["ibot_head"] if p.ibot_separate_head else self.teacher["dino_head"]
        s_ibot_head = self.student["ibot_head"] if p.ibot_separate_head else self.student["dino_head"]
        with torch.no_grad():
            t_cls, t_patch = self.teacher["backbone"](glob)
            t_logits = self.teacher["dino_head"](t_cls)
            targets = self.dino_targets(t_logits, temp, update=self.training).chunk(2)
            if use_ibot:
                t_patch_targets = self.ibot_targets(t_ibot_head(t_patch[masks]), temp, update=self.training)
        s_cls, s_patch = self.student["backbone"](glob, masks if use_ibot else None)
        student_views = list(self.student["dino_head"](s_cls).chunk(2))
        local = batch.get("local")
        if local is not None and local.numel():
            l_cls, _ = self.student["backbone"](local.to(dev, non_blocking=True))
            student_views += list(self.student["dino_head"](l_cls).chunk(p.n_local_crops))
        out: dict[str, torch.Tensor] = {"dino_loss": dino_loss(student_views, list(targets), p.student_temp)}
        loss = p.dino_weight * out["dino_loss"]
        if use_ibot:
            idx = masks.nonzero()[:, 0]
            out["ibot_loss"] = ibot_patch_loss(
                s_ibot_head(s_patch[masks]), t_patch_targets, idx, n_glob, p.student_temp
            )
            loss = loss + p.ibot_weight * out["ibot_loss"]
        if p.koleo_weight > 0 and n_glob >= 4:
            out["koleo_loss"] = sum(koleo_loss(c) for c in s_cls.chunk(2)) / 2
            loss = loss + p.koleo_weight * out["koleo_loss"]
        mean_t = torch.cat(targets).mean(0)
        out = {k: v.detach() for k, v in out.items()}
        out["teacher_entropy"] = -(mean_t * torch.log(mean_t.clamp_min(1e-12))).sum()
        out["loss"] = loss
        return out

    def tile_encoder_state_dict(self, which: Literal["teacher", "student"] = "teacher") -> dict[str, torch.Tensor]:
        """Backbone weights in timm layout (``blocks.0.attn.qkv.weight``...), for the tile encoder's ``weights:``."""
        vit = getattr(self, which)["backbone"].vit
        return {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}


@hookimpl
def gigapath_ssl_objectives():
    return [DINOv2Objective]
