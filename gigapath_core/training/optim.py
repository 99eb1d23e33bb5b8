"""Optimiser, layer-wise learning-rate decay and the warm-up + cosine schedule (Xu et al. 2024, Methods: mutation
prediction, cancer subtyping)."""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class TrainConfig(BaseModel):
    """Trainer settings (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (after warm-up)")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay per layer from the top (0.9)")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up, optimiser steps")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    checkpoint_every: int = Field(0, ge=0, description="optimiser steps between checkpoints; 0 = end of each epoch")
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    device: str = "auto"
    progress: bool = True


def layerwise_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None,
                           layer_id: Callable[[str], int] | None = None, num_layers: int | None = None) -> list[dict]:
    """Parameter groups with layer-wise lr decay: group of layer ``i`` gets ``lr * layer_decay ** (L - i)``.

    Args:
        layer_id: parameter name -> layer index in [0, L] (0 = embeddings, L = head); required with layer_decay.
        num_layers: L.
    No weight decay on biases, norms and 1-D parameters (the usual AdamW practice).
    """
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name.endswith(".bias") or "token" in name
        scale = 1.0
        if layer_decay is not None and layer_id is not None and num_layers is not None:
            scale = layer_decay ** (num_layers - layer_id(name))
        key = (scale, no_wd)
        g = groups.setdefault(key, {"params": [], "lr": lr * scale, "lr_scale": scale,
                                    "weight_decay": 0.0 if no_wd else weight_decay})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig, layer_id=None, num_layers=None) -> torch.optim.AdamW:
    groups = layerwise_param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay, layer_id, num_layers)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 to each group's lr over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
