"""Exponential moving average of weights (DINOv2 teacher, Xu et al. 2024, Methods: tile encoder)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * source`` for every parameter (buffers copied)."""
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in source.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1 - momentum)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)
