"""Nyström self-attention in plain torch (Xiong et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating
Self-Attention", AAAI 2021), as TransMIL uses it (layout of lucidrains/nystrom-attention ``NystromAttention``, the
package TransMIL imports: ``to_qkv`` without bias, ``to_out`` = Linear + Dropout, a depth-wise ``res_conv`` on the
values).

With queries Q, keys K, values V (per head, Q scaled by d^-1/2) and m landmarks Q~, K~ (means of consecutive
segments of Q and K), the paper's eq. (15) approximates softmax(Q K^T) V by::

    F = softmax(Q K~^T)        (n x m)
    A = softmax(Q~ K~^T)       (m x m)
    B = softmax(Q~ K^T)        (m x n)
    out = F A^+ (B V)  [+ depth-wise conv over the sequence of V, kernel 33, the "residual" option]

A^+ is the Moore-Penrose pseudo-inverse by the iterative scheme of the paper's §3 (Razavi et al. 2014):
Z_0 = A^T / (max_j sum_i |A_ij| · max_i sum_j |A_ij|), Z_{k+1} = 1/4 Z_k (13 I - A Z_k (15 I - A Z_k (7 I - A Z_k))).
The sequence is zero-padded at the front to a multiple of m (as the reference implementation) and the output
keeps the last n positions.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def iterative_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """(..., m, m) -> (..., m, m) approximate Moore-Penrose pseudo-inverse (Nyströmformer §3, 6 iterations)."""
    scale = a.abs().sum(-1).max() * a.abs().sum(-2).max()
    z = a.transpose(-1, -2) / scale
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """(B, n, dim) -> (B, n, dim) multi-head Nyström attention with ``num_landmarks`` landmarks."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, num_landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int | None = 33, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.num_landmarks, self.pinv_iterations = num_landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual_kernel:
            self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                      groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.num_landmarks
        pad = (-n) % m
        if pad:
            x = nn.functional.pad(x, (0, 0, pad, 0))  # zeros in front, as the reference implementation
        total = x.shape[1]
        q, k, v = (t.reshape(b, total, self.heads, self.dim_head).transpose(1, 2)
                   for t in self.to_qkv(x).chunk(3, dim=-1))  # (B, h, total, d) each
        q = q * self.dim_head ** -0.5
        seg = math.ceil(n / m)  # tokens per landmark (total = m * seg)
        q_l = q.reshape(b, self.heads, m, seg, self.dim_head).mean(3)
        k_l = k.reshape(b, self.heads, m, seg, self.dim_head).mean(3)
        f = torch.softmax(q @ k_l.transpose(-1, -2), -1)
        a = torch.softmax(q_l @ k_l.transpose(-1, -2), -1)
        bmat = torch.softmax(q_l @ k.transpose(-1, -2), -1)
        out = (f @ iterative_pinv(a, self.pinv_iterations)) @ (bmat @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, total, self.heads * self.dim_head)
        return self.to_out(out)[:, -n:]
