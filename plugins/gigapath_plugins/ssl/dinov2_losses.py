"""DINOv2 building blocks: projection head, teacher centering (running centre or Sinkhorn–Knopp), the DINO
image-level loss, the iBOT masked-patch loss and the KoLeo regulariser.

Definitions follow Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (TMLR 2024),
§4 (DINO + iBOT + KoLeo), Caron et al., "Emerging Properties in Self-Supervised Vision Transformers"
(ICCV 2021, DINO centering and sharpening), Zhou et al., "iBOT" (ICLR 2022) and Sablayrolles et al.,
"Spreading vectors for similarity search" (ICLR 2019, KoLeo). The Prov-GigaPath tile encoder was pretrained
with this recipe (Xu et al. 2024, Methods: tile encoder).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP projection head: Linear-GELU (x ``n_layers - 1``) -> bottleneck -> L2 norm -> weight-normalised
    Linear to ``out_dim`` prototypes (no bias; each prototype has unit norm, i.e. weight norm with g = 1).

    Shapes: (..., in_dim) float -> (..., out_dim) logits.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(n_layers, 1) - 1) + [bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(x, F.normalize(self.prototypes, dim=-1, eps=1e-6))


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iter: int = 3) -> torch.Tensor:
    """Balanced soft assignment of B samples to K prototypes (DINOv2 §4, from SwAV).

    Args:
        logits: (B, K) teacher logits; temp: teacher temperature.
    Returns:
        (B, K) float32 targets; each row sums to 1 and, after enough iterations, each prototype receives
        B / K of the total mass (column sums equal), which is what prevents collapse.
    """
    q = torch.exp((logits.float() - logits.float().max()) / temp).T  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iter):
        q /= q.sum(dim=1, keepdim=True).clamp_min(1e-30)
        q /= k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)
        q /= b
    return (q * b).T


class TeacherTargets(nn.Module):
    """Teacher logits -> soft targets with collapse prevention.

    ``method="centering"``: softmax((logits - c) / temp) with the running centre
    ``c <- m c + (1 - m) mean_batch(logits)`` (DINO); ``method="sinkhorn_knopp"``: :func:`sinkhorn_knopp`.
    The centre is a buffer (saved in checkpoints).
    """

    def __init__(self, out_dim: int, method: str = "centering", center_momentum: float = 0.9, sk_iters: int = 3):
        super().__init__()
        if method not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"unknown centering method {method!r} (centering | sinkhorn_knopp)")
        self.method, self.center_momentum, self.sk_iters = method, center_momentum, sk_iters
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temp: float, update: bool = True) -> torch.Tensor:
        """(M, K) teacher logits -> (M, K) float32 targets (rows sum to 1); updates the centre if ``update``."""
        logits = logits.float()
        if self.method == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sk_iters)
        out = F.softmax((logits - self.center) / temp, dim=-1)
        if update:
            mean = logits.mean(dim=0, keepdim=True)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(mean)
                mean /= torch.distributed.get_world_size()
            self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
        return out


def dino_loss(
    student_logits: list[torch.Tensor], teacher_targets: list[torch.Tensor], student_temp: float
) -> torch.Tensor:
    """DINO cross-view loss: mean over (teacher view t, student view s != t) of
    ``-sum_k target_t[k] * log_softmax(student_s / student_temp)[k]``, averaged over the batch.

    Args:
        student_logits: one (B, K) tensor per student view; the first ``len(teacher_targets)`` are the
            global views the teacher also saw (same order).
        teacher_targets: one (B, K) tensor of targets per global view.
    """
    logp = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, n = 0.0, 0
    for ti, t in enumerate(teacher_targets):
        for si, lp in enumerate(logp):
            if si == ti:
                continue
            total = total + (-(t * lp).sum(dim=-1)).mean()
            n += 1
    return total / max(n, 1)


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_targets: torch.Tensor,
    sample_index: torch.Tensor,
    n_samples: int,
    student_temp: float,
) -> torch.Tensor:
    """iBOT masked-patch loss: cross-entropy between teacher targets and student predictions at masked
    patches, averaged within each image first (every masked image weighs the same), then over images.

    Args:
        student_patch_logits, teacher_patch_targets: (M, K) for the M masked patches of the batch.
        sample_index: (M,) int64, which global-view image each masked patch belongs to.
        n_samples: number of global-view images (2B).
    """
    if student_patch_logits.numel() == 0:
        return student_patch_logits.sum() * 0.0
    ce = -(teacher_patch_targets * F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)).sum(-1)
    counts = torch.bincount(sample_index, minlength=n_samples).clamp_min(1).to(ce.dtype)
    per_image = torch.zeros(n_samples, dtype=ce.dtype, device=ce.device).index_add_(0, sample_index, ce) / counts
    masked = torch.bincount(sample_index, minlength=n_samples) > 0
    return per_image[masked].mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko–Leonenko entropy regulariser: ``-(1/n) sum_i log(min_{j != i} ||z_i - z_j||_2 + eps)`` with
    ``z = x / ||x||`` (DINOv2 §4; applied to the student CLS features of each global view).

    Args:
        x: (n, D) float features, n >= 2.
    Returns:
        scalar tensor.
    """
    z = F.normalize(x.float(), dim=-1, eps=eps)
    d = torch.cdist(z, z)
    d = d + torch.diag(torch.full((z.shape[0],), float("inf"), device=z.device))
    return -torch.log(d.min(dim=1).values + eps).mean()
