"""Dense attention kernels that return the output *and* the log-sum-exp (LSE) of each query's logits.

Dilated attention (see :mod:`.dilated_attention`) mixes its branches with weights ``softmax(LSE)``, so every
kernel here returns ``(out, lse)`` for queries ``q`` (G, H, Nq, d) and keys/values ``k``, ``v`` (G, H, Nk, d):

    out = softmax(scale * q k^T) v          (G, H, Nq, d), dtype of q
    lse = logsumexp(scale * q k^T, dim=-1)  (G, H, Nq), float32 (float64 for float64 inputs)

Backends (``backend=``):

- ``"math"``: plain PyTorch (matmul + logsumexp + exp), chunked over queries so that memory stays bounded;
  any device and dtype (float64 included). Differentiable by autograd.
- ``"fused"``: PyTorch's fused kernels that already compute the LSE: on CPU
  ``aten._scaled_dot_product_flash_attention_for_cpu`` (float32/float64/bfloat16/float16), on CUDA
  ``aten._scaled_dot_product_efficient_attention`` (float32/bfloat16/float16). Both have autograd formulas.
- ``"flash_attn"``: the optional ``flash-attn`` package (CUDA, float16/bfloat16), the reference's kernel.
- ``"auto"``: ``flash_attn`` when installed and applicable, else ``fused`` when applicable, else ``math``.
  A fused kernel that fails at run time falls back to ``math`` once, with a warning.

In every backend the LSE is returned detached: the reference treats the branch weights as constants in
backward (Xu et al. 2024, Methods: slide encoder (LongNet)).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch

log = logging.getLogger("gigapath")

Backend = Literal["auto", "fused", "math", "flash_attn"]
BACKENDS = ("auto", "fused", "math", "flash_attn")
#: upper bound on the logits one ``math`` chunk materialises (elements)
MATH_CHUNK_ELEMENTS = 1 << 24
_warned: set[str] = set()


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def _cpu_fused():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cuda_fused():
    return getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend (``fused``, ``math`` or ``flash_attn``) for ``backend`` on this device/dtype.

    Raises ValueError if ``flash_attn`` is requested but not installed or not applicable.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    half = dtype in (torch.float16, torch.bfloat16)
    if backend == "flash_attn":
        if not (device.type == "cuda" and half and flash_attn_available()):
            raise ValueError("attention backend 'flash_attn' needs the flash-attn package, a CUDA device and "
                             f"float16/bfloat16 inputs (got {device.type}, {dtype}); use 'auto'")
        return "flash_attn"
    if backend == "math":
        return "math"
    if device.type == "cuda" and half and flash_attn_available() and backend == "auto":
        return "flash_attn"
    if device.type == "cpu" and _cpu_fused() is not None and dtype.is_floating_point:
        return "fused"
    if device.type == "cuda" and _cuda_fused() is not None and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return "fused"
    return "math"


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch attention with LSE (see module doc); logits in float32 for half inputs, chunked so that
    one chunk holds at most :data:`MATH_CHUNK_ELEMENTS` logits."""
    G, H, nq, d = q.shape
    nk = k.shape[2]
    acc = _lse_dtype(q.dtype)
    qf, kf, vf = (t.reshape(G * H, t.shape[2], d).to(acc) for t in (q, k, v))
    budget = max(1, MATH_CHUNK_ELEMENTS // max(1, nk))  # query rows per chunk
    bstep, qstep = max(1, budget // nq), min(nq, budget)
    outs, lses = [], []
    for b0 in range(0, G * H, bstep):
        for i0 in range(0, nq, qstep):
            s = torch.matmul(qf[b0:b0 + bstep, i0:i0 + qstep], kf[b0:b0 + bstep].transpose(-1, -2)) * scale
            lse = torch.logsumexp(s, dim=-1)
            outs.append(torch.matmul(torch.exp(s - lse.unsqueeze(-1)), vf[b0:b0 + bstep]))
            lses.append(lse)
    if qstep < nq:  # one batch row per chunk, several query chunks: concatenate along queries first
        per_row = -(-nq // qstep)
        outs = [torch.cat(outs[i:i + per_row], dim=1) for i in range(0, len(outs), per_row)]
        lses = [torch.cat(lses[i:i + per_row], dim=1) for i in range(0, len(lses), per_row)]
    out = torch.cat(outs).reshape(G, H, nq, d).to(q.dtype)
    return out, torch.cat(lses).reshape(G, H, nq).detach()


def _attention_fused(q, k, v, scale):
    if q.device.type == "cpu":
        out, lse = _cpu_fused()(q, k, v, 0.0, False, scale=scale)
    else:
        out, lse = _cuda_fused()(q, k, v, None, True, 0.0, False, scale=scale)[:2]
        lse = lse[..., : q.shape[2]]
    return out, lse.detach().to(_lse_dtype(q.dtype))


def _attention_flash_attn(q, k, v, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0,
                                  softmax_scale=scale, causal=False, return_attn_probs=True)
    return out.transpose(1, 2), lse[..., : q.shape[2]].detach().float()


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention returning ``(out, lse)``.

    Args:
        q: (G, H, Nq, d); k, v: (G, H, Nk, d); same dtype and device.
        scale: logit scale, default ``d ** -0.5``.
        backend: ``auto`` | ``fused`` | ``math`` | ``flash_attn`` (see module doc).
    Returns:
        out (G, H, Nq, d) of q's dtype; lse (G, H, Nq) float32 (float64 for float64 inputs), detached.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:3], dtype=_lse_dtype(q.dtype))
    chosen = choose_backend(backend, q.device, q.dtype)
    if chosen == "math":
        return attention_math(q, k, v, scale)
    try:
        if chosen == "flash_attn":
            return _attention_flash_attn(q, k, v, scale)
        return _attention_fused(q, k, v, scale)
    except (RuntimeError, NotImplementedError) as err:
        if backend != "auto":
            raise
        key = f"{chosen}:{q.device.type}:{q.dtype}"
        if key not in _warned:
            _warned.add(key)
            log.warning("fused attention kernel failed on %s %s (%s); using the plain PyTorch kernel",
                        q.device.type, q.dtype, str(err).splitlines()[0] if str(err) else type(err).__name__)
        return attention_math(q, k, v, scale)
