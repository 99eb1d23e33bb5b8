"""The LongNet forward's own kernels, each run alone: how close the whole forward is to its compute limit
(issue #16.4, "at the compute limit, shown").

One forward is recorded with a ``TorchDispatchMode`` that notes every linear layer (``aten.linear``) and every
fused attention call (CPU: ``aten._scaled_dot_product_flash_attention_for_cpu``) with its shapes, strides and
arguments. Each distinct call is then replayed alone on fresh random tensors of the same shapes and strides
(:class:`KernelReplay`: best of a few timings, times the number of times the forward made it). The sum is the
time the forward's matrix products take with nothing else around them: the forward can only beat it by doing
less arithmetic or with faster kernels than PyTorch's own (oneDNN/MKL GEMM, the fused flash-attention kernel).
What is left between that sum and the forward is element-wise work (LayerNorm, GELU, residual adds, compact
copies of the dilated positions), memory-bound.

The recorded FLOPs equal ``LongNetSlideEncoder.forward_flops`` exactly (``tests/test_kernel_replay.py``), so no
product is missed.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_ATEN = torch.ops.aten


def _attention_ops() -> set:
    ops = set()
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention"):
        packet = getattr(_ATEN, name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


class _Recorder(TorchDispatchMode):
    """Counts the linear and fused-attention calls of what runs under it, keyed by their full signature."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self._attention = _attention_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _ATEN.linear.default or func in self._attention:
            sig = tuple((tuple(a.shape), tuple(a.stride()), a.dtype, a.device.type) if isinstance(a, torch.Tensor)
                        else a for a in args)
            self.calls[(func, sig, tuple(sorted(kwargs.items())))] += 1
        return func(*args, **kwargs)


def call_flops(func, sig: tuple) -> int:
    """Multiply-adds x 2 of one recorded call: a linear layer (x (..., K), weight (N, K)) or an attention call
    (q (B, H, Nq, d), k (B, H, Nk, d): q k^T and p v)."""
    if func is _ATEN.linear.default:
        x_shape, w_shape = sig[0][0], sig[1][0]
        rows = 1
        for s in x_shape[:-1]:
            rows *= s
        return 2 * rows * w_shape[1] * w_shape[0]
    (B, H, nq, d), nk = sig[0][0], sig[1][0][2]
    return 4 * B * H * nq * nk * d


def _fresh(arg, gen: torch.Generator):
    if not (isinstance(arg, tuple) and len(arg) == 4 and isinstance(arg[2], torch.dtype)):
        return arg
    shape, stride, dtype, device = arg
    t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    return t.normal_(generator=gen) if device == "cpu" else t.normal_()


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def record(model, *inputs) -> Counter:
    """Counter of ``(func, signature, kwargs)`` over one inference forward ``model(*inputs)``."""
    rec = _Recorder()
    with torch.inference_mode(), rec:
        model(*inputs)
    return rec.calls


class KernelReplay:
    """The distinct GEMM / attention calls of one inference forward ``model(*inputs)``, replayed alone.

    Call :meth:`round` once per benchmark round (beside the timed forwards, so that both see the same machine
    load); :meth:`summary` sums, per call, the median over rounds of its best-of-``repeats`` time.
    """

    def __init__(self, model, *inputs):
        self.calls = record(model, *inputs)
        self._times: list[list[float]] = [[] for _ in self.calls]

    def round(self, repeats: int = 2) -> None:
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for i, (func, sig, kwargs) in enumerate(self.calls):
                args = [_fresh(a, gen) for a in sig]  # made per call and freed after it: no resident copies
                device = next(a[3] for a in sig if isinstance(a, tuple) and len(a) == 4)
                func(*args, **dict(kwargs))  # warm-up
                best = float("inf")
                for _ in range(repeats):
                    _sync(device)
                    t0 = time.perf_counter()
                    func(*args, **dict(kwargs))
                    _sync(device)
                    best = min(best, time.perf_counter() - t0)
                self._times[i].append(best)
                del args

    def summary(self) -> dict:
        """``{"linear": {...}, "attention": {...}, "seconds", "flops", "distinct_calls", "rounds"}``; each kind
        holds ``seconds`` (sum over the forward's calls), ``flops`` (int) and ``gflops_per_s``."""
        out = {kind: {"seconds": 0.0, "flops": 0} for kind in ("linear", "attention")}
        for ((func, sig, _), count), times in zip(self.calls.items(), self._times):
            kind = out["linear" if func is _ATEN.linear.default else "attention"]
            kind["seconds"] += statistics.median(times) * count if times else 0.0
            kind["flops"] += call_flops(func, sig) * count
        for kind in out.values():
            kind["gflops_per_s"] = round(kind["flops"] / kind["seconds"] / 1e9, 1) if kind["seconds"] else None
            kind["seconds"] = round(kind["seconds"], 6)
        return {**out, "seconds": round(out["linear"]["seconds"] + out["attention"]["seconds"], 6),
                "flops": out["linear"]["flops"] + out["attention"]["flops"], "distinct_calls": len(self.calls),
                "rounds": min((len(t) for t in self._times), default=0)}
