"""Dilated attention of the LongNet slide encoder against an independent, literal oracle (Xu et al. 2024, Methods:
slide encoder (LongNet) and
``../shared/data/reference/README.md``): per segment, per head, per query, written with Python loops.

The parity fixture only holds sequences shorter than the smallest segment (one segment per branch), so the
multi-segment, tail, inner-padding and head-padding paths are checked here against the oracle."""

from __future__ import annotations

import math

import pytest
import torch

from gigapath_plugins.slide_encoders.longnet.dilated_attention import dilated_attention
from gigapath_plugins.slide_encoders.longnet.kernels import attention_with_lse


def oracle(q, k, v, segments, ratios, masked=False, detach_weights=True):
    """q, k, v: (L, H, d) float64 -> (L, H, d), following Xu et al. 2024, Methods: slide encoder (LongNet) literally.

    Branch (s, r): segments of sl = min(s, L) positions, each zero-padded to a multiple of r; head h belongs to
    group g = h // ceil(H / r) and keeps segment positions g, g + r, ...; dense softmax attention among the kept
    positions, zero-padding keys included (logit 0, value 0) unless ``masked``; branch outputs mixed per
    (position, head) by softmax over branches of the log-sum-exp, positions a branch does not keep excluded.
    """
    L, H, d = q.shape
    scale = 1.0 / math.sqrt(d)
    outs, lses = [], []
    for s, r in zip(segments, ratios):
        sl = min(s, L)
        seg_len = -(-sl // r) * r
        hp = -(-H // r)
        out = torch.zeros(L, H, d, dtype=q.dtype)
        lse = torch.full((L, H), float("-inf"), dtype=q.dtype)
        for i in range(-(-L // sl)):
            for h in range(H):
                g = h // hp
                kept = list(range(g, seg_len, r))
                real = [i * sl + p for p in kept if p < sl and i * sl + p < L]
                n_pad = 0 if masked else len(kept) - len(real)
                if not real:
                    continue
                keys = torch.cat([k[real, h], torch.zeros(n_pad, d, dtype=q.dtype)])
                values = torch.cat([v[real, h], torch.zeros(n_pad, d, dtype=q.dtype)])
                for p in real:
                    logits = keys @ q[p, h] * scale
                    lse_p = torch.logsumexp(logits, 0)
                    out[p, h] = torch.softmax(logits, 0) @ values
                    lse[p, h] = lse_p
        outs.append(out)
        lses.append(lse)
    lse_all = torch.stack(lses)
    if detach_weights:
        lse_all = lse_all.detach()
    w = torch.softmax(lse_all, dim=0)
    return sum(w[i].unsqueeze(-1) * outs[i] for i in range(len(outs)))


CASES = [
    # L, H, segments, ratios: several segments with tails; one segment; H not divisible by r;
    # segment length not divisible by r with several segments (padding inside segments)
    (45, 4, [8, 16, 32], [1, 2, 4]),
    (13, 4, [1024, 5792], [1, 2]),
    (37, 3, [6, 9, 100], [1, 2, 4]),
    (64, 8, [16, 64], [1, 8]),
]


def _qkv(L, H, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, H, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("L,H,segments,ratios", CASES)
@pytest.mark.parametrize("padding", ["reference", "masked"])
@pytest.mark.parametrize("backend", ["math", "fused"])
def test_matches_oracle(L, H, segments, ratios, padding, backend):
    q, k, v = _qkv(L, H)
    want = oracle(q, k, v, segments, ratios, masked=padding == "masked")
    got = dilated_attention(q[None], k[None], v[None], segments, ratios, segment_padding=padding, backend=backend)[0]
    assert torch.allclose(got, want, atol=1e-12, rtol=0), (got - want).abs().max()


def test_reference_padding_differs_from_masked():
    """The checkpoint-compatible default really lets padding keys into the softmax (README behaviour 1)."""
    q, k, v = _qkv(45, 4)
    ref = dilated_attention(q[None], k[None], v[None], [8, 16, 32], [1, 2, 4])[0]
    masked = dilated_attention(q[None], k[None], v[None], [8, 16, 32], [1, 2, 4], segment_padding="masked")[0]
    # positions 40..44 are in the padded last segment of the first branch
    assert (ref[40:] - masked[40:]).abs().max() > 1e-3
    assert torch.allclose(ref, oracle(q, k, v, [8, 16, 32], [1, 2, 4]), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_low_precision_close_to_float64(dtype, tol):
    q, k, v = _qkv(45, 4, d=8, seed=3)
    want = oracle(q, k, v, [8, 16, 32], [1, 2, 4])
    for backend in ("math", "fused"):
        got = dilated_attention(*(t[None].to(dtype) for t in (q, k, v)), [8, 16, 32], [1, 2, 4], backend=backend)
        assert got.dtype == dtype
        assert (got[0].double() - want).abs().max() < tol, backend


def test_batch_rows_are_independent():
    q, k, v = (torch.stack(t) for t in zip(_qkv(45, 4, seed=1), _qkv(45, 4, seed=2)))
    both = dilated_attention(q, k, v, [8, 16], [1, 2])
    for b in range(2):
        alone = dilated_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], [8, 16], [1, 2])
        assert torch.allclose(both[b], alone[0], atol=1e-13)


def test_kernels_return_lse():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64) for n in (4, 7, 7))
    logits = q @ k.transpose(-1, -2) / math.sqrt(5)
    for backend in ("math", "fused"):
        out, lse = attention_with_lse(q, k, v, backend=backend)
        assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-12)
        assert torch.allclose(out, torch.softmax(logits, -1) @ v, atol=1e-12)
        assert not lse.requires_grad


@pytest.mark.parametrize("backend", ["math", "fused"])
def test_branch_weights_are_constants_in_backward(backend):
    """Gradients equal autograd of the oracle with detached branch weights, and differ from the oracle whose
    weights are differentiated (README behaviour 2)."""
    L, H, segs, ratios = 45, 4, [8, 16, 32], [1, 2, 4]
    base = _qkv(L, H, seed=5)
    g = torch.Generator().manual_seed(9)
    probe = torch.randn(L, H, 6, generator=g, dtype=torch.float64)

    def grads(fn):
        qkv = [t.clone().requires_grad_(True) for t in base]
        (fn(*qkv) * probe).sum().backward()
        return torch.cat([t.grad.flatten() for t in qkv])

    ours = grads(lambda q, k, v: dilated_attention(q[None], k[None], v[None], segs, ratios, backend=backend)[0])
    const = grads(lambda q, k, v: oracle(q, k, v, segs, ratios, detach_weights=True))
    full = grads(lambda q, k, v: oracle(q, k, v, segs, ratios, detach_weights=False))
    assert torch.allclose(ours, const, atol=1e-10), (ours - const).abs().max()
    assert (ours - full).abs().max() > 1e-3


@pytest.mark.parametrize("padding", ["reference", "masked"])
@pytest.mark.parametrize("L,H,segments,ratios", [(300, 8, [64, 100, 256, 1024], [1, 2, 4, 8]),
                                                 (301, 6, [37, 128, 512], [3, 4, 16])])
def test_attention_flops_equal_the_flop_counter_on_the_math_kernel(L, H, segments, ratios, padding):
    """Several segments per branch, ragged tails, segments not divisible by r (padding inside them), head
    padding (H % r != 0), and masked padding keys: the analytic count equals every matmul the math kernel runs."""
    from torch.utils.flop_counter import FlopCounterMode

    from gigapath_plugins.slide_encoders.longnet.dilated_attention import attention_flops

    d = 8
    q, k, v = (t[None] for t in _qkv(L, H, d, dtype=torch.float32))
    with FlopCounterMode(display=False) as counter:
        dilated_attention(q, k, v, segments, ratios, segment_padding=padding, backend="math")
    expected = counter.get_total_flops()
    got = attention_flops(L, segments, ratios, H, d, 1, padding)
    assert got == expected
    assert attention_flops(L, segments, ratios, H, d, 3, padding) == 3 * expected
    dense = 4 * L * L * H * d  # one branch, one segment: plain global attention
    assert attention_flops(L, [L], [1], H, d) == dense


def test_model_forward_flops_equal_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from gigapath_plugins.slide_encoders.longnet import LongNetSlideEncoder

    torch.manual_seed(0)
    model = LongNetSlideEncoder(in_chans=24, embed_dim=32, depth=2, num_heads=4, segment_lengths=[64, 128, 512],
                                dilated_ratios=[1, 2, 4], attention_backend="math").eval()
    n = 299
    x = torch.randn(2, n, 24)
    coords = torch.stack([torch.arange(n) % 20, torch.arange(n) // 20], -1)[None].expand(2, -1, -1) * 256
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, coords)
    assert model.forward_flops(n, batch=2) == counter.get_total_flops()
