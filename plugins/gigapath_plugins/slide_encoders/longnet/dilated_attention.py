"""Dilated attention (LongNet, Ding et al. 2023) as used by the Prov-GigaPath slide encoder (Xu et al. 2024, Methods:
slide encoder (LongNet)).

For each branch k with segment length ``s_k`` and dilation ratio ``r_k``, on a sequence of L tokens:

1. the sequence is cut into segments of ``sl = min(s_k, L)`` tokens; the last one is zero-padded to ``sl``,
   and each segment to a multiple of ``r_k`` (``n = ceil(sl / r_k)`` positions per head group);
2. the H heads are split into ``r_k`` groups of ``ceil(H / r_k)``; head group g keeps positions
   ``g, g + r_k, g + 2 r_k, ...`` of every segment;
3. dense softmax attention runs inside each (segment, head) with the kept positions as queries and keys;
   positions a branch does not keep get no output from it;
4. branch outputs are mixed per token and head with weights ``softmax_k(LSE_k)`` (LSE_k: log-sum-exp of that
   branch's logits for the query), the weights being constants in backward.

Cost is O(L * s) instead of O(L^2): only compact (G, H, n, d) copies of the kept positions are made, and
queries that are pure padding are not computed.

Padding (``segment_padding``):

- ``"reference"`` (default, checkpoint-compatible): the zero-padding keys of step 1 take part in the softmax
  of the queries of that segment, as in the released implementation: a key of zeros has logit 0 and value 0,
  so it only adds ``exp(0)`` to the softmax denominator (and to the branch's LSE). This is how the released
  weights were trained; it makes the last segment's attention depend on how much padding it holds.
- ``"masked"``: padding keys are excluded; each query attends only to real tokens.

The full sequence always belongs to one slide: batched slides of different lengths are handled by the caller
(:class:`DilatedSelfAttention`) by running each length separately, so a slide gives the same result alone or
in a padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import attention_with_lse

SegmentPadding = Literal["reference", "masked"]


@dataclass(frozen=True)
class BranchLayout:
    """How one branch cuts a sequence of ``length`` tokens.

    Segments of ``sl`` tokens; each is zero-padded to ``per_group * ratio`` positions and the heads to
    ``heads_per_group * ratio``; head group g keeps positions ``g, g + r, ...`` of each segment.

    Attributes:
        length: L; segment: ``sl = min(s, L)``; ratio: r.
        n_full: complete segments (``L // sl``); tail: tokens of the last, incomplete segment (0 if none).
        per_group: n = ceil(sl / r), kept positions per head group and segment, padding included.
        heads_per_group: ceil(H / r); num_heads: H.
    """

    length: int
    segment: int
    ratio: int
    n_full: int
    tail: int
    per_group: int
    heads_per_group: int
    num_heads: int

    @property
    def padded_heads(self) -> int:
        return self.heads_per_group * self.ratio

    @property
    def aligned(self) -> bool:
        """Segments hold a whole number of dilation rows (sl % r == 0): complete segments are strided views."""
        return self.segment % self.ratio == 0

    def ragged_segments(self) -> list[tuple[int, int]]:
        """(start, tokens) of the segments handled one by one: the tail, or every segment if not aligned."""
        sl = self.segment
        segs = [] if self.aligned else [(i * sl, sl) for i in range(self.n_full)]
        return segs + ([(self.n_full * sl, self.tail)] if self.tail else [])


def branch_layout(length: int, segment_length: int, ratio: int, num_heads: int) -> BranchLayout:
    sl = min(segment_length, length)
    return BranchLayout(length, sl, ratio, length // sl, length % sl, -(-sl // ratio), -(-num_heads // ratio),
                        num_heads)


def _pad_dim(x: torch.Tensor, dim: int, amount: int, value: float = 0.0) -> torch.Tensor:
    """Append ``amount`` entries of ``value`` along ``dim``."""
    if amount <= 0:
        return x
    pad = [0, 0] * (x.dim() - dim - 1) + [0, amount]
    return F.pad(x, pad, value=value)


def _rows(x: torch.Tensor, start: int, rows: int, r: int) -> torch.Tensor:
    """View of the kept entries of ``rows`` dilation rows from ``start``: x (B, >= start + rows*r, r*hp, *f) ->
    (B, rows, hp, *f, r); entry ``[b, j, h, ..., g]`` is position ``start + j*r + g`` of head ``g*hp + h``."""
    B, _, Hp = x.shape[:3]
    f = tuple(x.shape[3:])
    return x[:, start:start + rows * r].reshape(B, rows, r, r, Hp // r, *f).diagonal(dim1=2, dim2=3)


def _rows_to_compact(v: torch.Tensor) -> torch.Tensor:
    """(B, S, n, hp, d, r) -> (B, S, r*hp, n, d) head-major (one copy; a view when r == 1)."""
    B, S, n, hp, d, r = v.shape
    return v.permute(0, 1, 5, 3, 2, 4).reshape(B, S, r * hp, n, d)


def _compact_to_rows(c: torch.Tensor, r: int) -> torch.Tensor:
    """(B, S, r*hp, n, *f) -> view (B, S, n, hp, *f, r), the layout of :func:`_rows`."""
    B, S, Hp, n = c.shape[:4]
    f = tuple(c.shape[4:])
    return c.reshape(B, S, r, Hp // r, n, *f).permute(0, 1, 4, 3, *range(5, 5 + len(f)), 2)


def _ragged_compact(x: torch.Tensor, start: int, tokens: int, lay: BranchLayout) -> torch.Tensor:
    """Compact (B, 1, Hp, n, *f) of one segment of ``tokens`` tokens (<= n*r) from ``start``, zeros at padding."""
    B, _, Hp = x.shape[:3]
    f = tuple(x.shape[3:])
    r, n = lay.ratio, lay.per_group
    m, rem = divmod(tokens, r)
    out = x.new_empty((B, 1, Hp, n, *f))
    out[:, :, :, m + (rem > 0):].zero_()  # rows of padding only; the others are written whole below
    rows = _compact_to_rows(out, r)  # view into out
    if m:
        rows[:, 0, :m].copy_(_rows(x, start, m, r))
    if rem:
        last = _pad_dim(x[:, start + m * r:start + tokens], 1, r - rem)
        rows[:, 0, m:m + 1].copy_(_rows(last, 0, 1, r))
    return out


def _scatter_rows(target: torch.Tensor, start: int, tokens: int, r: int, src: torch.Tensor, weight=None,
                  assign: bool = False) -> None:
    """target[positions of ``tokens`` tokens from ``start``] (+)= src rows (B, ceil(tokens/r), hp, *f, r),
    times ``weight`` rows if given (then accumulated, or with ``assign`` written: r must be 1), else copied."""
    m, rem = divmod(tokens, r)
    assert not assign or r == 1

    def put(view, s, w):
        if weight is None:
            view.copy_(s)
        elif assign:
            torch.mul(s, w, out=view)
        else:
            view.addcmul_(s, w)

    if m:
        put(_rows(target, start, m, r), src[:, :m], None if weight is None else weight[:, :m])
    if rem:  # the last, partial row: through a padded copy of its r positions
        part = target[:, start + m * r:start + tokens]
        buf = _pad_dim(part.clone() if weight is None else torch.zeros_like(part), 1, r - rem)
        put(_rows(buf, 0, 1, r), src[:, m:m + 1], None if weight is None else weight[:, m:m + 1])
        if weight is None:
            part.copy_(buf[:, :rem])
        else:
            part += buf[:, :rem]


def _weight_rows(w: torch.Tensor, start: int, tokens: int, r: int) -> torch.Tensor:
    """Branch weights (B, L, Hp) of a segment as rows (B, ceil(tokens/r), hp, 1, r) (zeros past the end)."""
    m, rem = divmod(tokens, r)
    rows = [_rows(w, start, m, r)] if m else []
    if rem:
        rows.append(_rows(_pad_dim(w[:, start + m * r:start + tokens], 1, r - rem), 0, 1, r))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
    return out.unsqueeze(-2)


def _attend_piece(q, k, v, real: int, lay: BranchLayout, padding: str, backend: str, scale: float):
    """Attention of compact queries q (G, Hp, nq, d) over compact keys k, v (G, Hp, n, d) of segments holding
    ``real`` real positions. Returns out (G, Hp, nq, d) and lse (G, Hp, nq)."""
    counts = _keys_per_group(real, lay)
    if padding == "reference" or all(c == lay.per_group for c in counts):
        return attention_with_lse(q, k, v, scale, backend)
    G, Hp, nq, d = q.shape
    hp = lay.heads_per_group
    outs, lses = [], []
    for g, c in enumerate(counts):
        if c == 0:  # no real key (hence no real query) in this head group
            outs.append(q.new_zeros(G, hp, nq, d))
            lses.append(torch.full((G, hp, nq), float("-inf"), device=q.device, dtype=_lse_dtype(q.dtype)))
            continue
        sl = slice(g * hp, (g + 1) * hp)
        o, lse = attention_with_lse(q[:, sl], k[:, sl, :c], v[:, sl, :c], scale, backend)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _keys_per_group(real: int, lay: BranchLayout) -> list[int]:
    """Real keys of each head group in a segment holding ``real`` real positions (the rest is padding)."""
    return [max(0, -(-(real - g) // lay.ratio)) for g in range(lay.ratio)]


def _pieces(lay: BranchLayout) -> list[tuple[int, int, int, int]]:
    """The attention calls of one branch: ``(start, tokens, segments, queries)`` of each piece. Complete aligned
    segments form one piece (all ``per_group`` queries); each ragged segment is one, with only its real queries."""
    pieces = [(0, lay.n_full * lay.segment, lay.n_full, lay.per_group)] if lay.aligned and lay.n_full else []
    return pieces + [(start, tokens, 1, -(-tokens // lay.ratio)) for start, tokens in lay.ragged_segments()]


def attention_flops(length: int, segment_lengths: Sequence[int], dilated_ratios: Sequence[int], num_heads: int,
                    head_dim: int, batch: int = 1, segment_padding: SegmentPadding = "reference") -> int:
    """Floating-point operations of :func:`dilated_attention` on ``batch`` sequences of ``length`` tokens: the two
    matrix products (q k^T and p v, a multiply-add counting 2) of every (segment, head) as this module runs them,
    padding keys and head padding included, padding-only queries excluded; the softmax is not counted.

    Equals what ``torch.utils.flop_counter.FlopCounterMode`` counts for the ``math`` backend (which the fused CPU
    kernel does not report); ``tests/test_longnet_attention.py`` checks it. Int (exact)."""
    total = 0
    for s, r in zip(segment_lengths, dilated_ratios):
        lay = branch_layout(length, int(s), int(r), num_heads)
        for _, tokens, segments, queries in _pieces(lay):
            keys = _keys_per_group(tokens // segments, lay)  # real keys per head group of each segment
            if segment_padding == "reference" or all(c == lay.per_group for c in keys):
                keys = [lay.per_group] * r
            total += 4 * batch * segments * queries * head_dim * lay.heads_per_group * sum(keys)
    return total


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _branch(q, k, v, lay: BranchLayout, padding: str, backend: str, scale: float):
    """One branch on q, k, v (B, L, Hp, d). Returns pieces ``(start, tokens, out, lse)``: out (B, S, Hp, nq, d)
    and lse (B, S, Hp, nq) for S segments of ``tokens`` tokens each from ``start`` (only real queries)."""
    B, L, Hp, d = q.shape
    r, n = lay.ratio, lay.per_group
    pieces = []
    for start, tokens, nf, nq in _pieces(lay):
        if lay.aligned and tokens == nf * lay.segment:
            # complete segments: compact copies of strided views (no copy at all when r == 1)
            qc, kc, vc = (_rows_to_compact(_rows(t, 0, nf * n, r).reshape(B, nf, n, lay.heads_per_group, d, r))
                          .reshape(B * nf, Hp, n, d) for t in (q, k, v))
            o, lse = _attend_piece(qc, kc, vc, lay.segment, lay, padding, backend, scale)
            pieces.append((0, nf * lay.segment, o.view(B, nf, Hp, n, d), lse.view(B, nf, Hp, n)))
        else:  # the tail (and misaligned segments): only real queries
            qc, kc, vc = (_ragged_compact(t, start, tokens, lay)[:, 0] for t in (q, k, v))
            o, lse = _attend_piece(qc[:, :, :nq], kc, vc, tokens, lay, padding, backend, scale)
            pieces.append((start, tokens, o.unsqueeze(1), lse.unsqueeze(1)))
    return pieces


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
                      dilated_ratios: Sequence[int], *, segment_padding: SegmentPadding = "reference",
                      backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """Multi-branch dilated attention of one or more equally long sequences.

    Args:
        q, k, v: (B, L, H, d) projected queries, keys, values (float32/float64/bfloat16/float16).
        segment_lengths, dilated_ratios: one (s_k, r_k) per branch.
        segment_padding: ``"reference"`` (padding keys in the softmax, as the released model) or ``"masked"``.
        backend: attention kernel, see :func:`.kernels.attention_with_lse`.
        scale: logit scale, default ``d ** -0.5``.
    Returns:
        (B, L, H, d) of q's dtype. Gradients flow to q, k, v; the branch weights are constants.
    Memory: compact copies of the kept positions (1/r of the sequence per branch; none for r = 1), one padded
    segment per branch for the last segment, the outputs, and what the kernel needs; never O(L^2).
    """
    return dilated_attention_qkv(torch.stack([q, k, v], dim=2), segment_lengths, dilated_ratios,
                                 segment_padding=segment_padding, backend=backend, scale=scale)


def dilated_attention_qkv(qkv: torch.Tensor, segment_lengths: Sequence[int], dilated_ratios: Sequence[int], *,
                          segment_padding: SegmentPadding = "reference", backend: str = "auto",
                          scale: float | None = None) -> torch.Tensor:
    """:func:`dilated_attention` on stacked projections ``qkv`` (B, L, 3, H, d) (q, k, v along dim 2), as one
    fused projection produces them; returns (B, L, H, d)."""
    if len(segment_lengths) != len(dilated_ratios) or not segment_lengths:
        raise ValueError("segment_lengths and dilated_ratios must be non-empty and of equal length")
    B, L, _, H, d = qkv.shape
    scale = d**-0.5 if scale is None else scale
    acc_dtype = qkv.dtype if qkv.dtype in (torch.float32, torch.float64) else torch.float32
    lays = [branch_layout(L, int(s), int(r), H) for s, r in zip(segment_lengths, dilated_ratios)]
    results = []
    for lay in lays:  # heads padded to a multiple of r only where needed (H % r != 0)
        q, k, v = (_pad_dim(qkv[:, :, i], 2, lay.padded_heads - H) for i in range(3))
        results.append(_branch(q, k, v, lay, segment_padding, backend, scale))

    lse_dtype = results[0][0][3].dtype
    with torch.no_grad():  # branch weights softmax_k(LSE_k): constants in backward (Xu et al. 2024, Methods)
        dense = torch.full((len(lays), B, L, H), float("-inf"), dtype=lse_dtype, device=qkv.device)
        for i, (lay, pieces) in enumerate(zip(lays, results)):
            own = dense[i] if lay.padded_heads == H else torch.full(
                (B, L, lay.padded_heads), float("-inf"), dtype=lse_dtype, device=qkv.device)
            for start, tokens, _, lse in pieces:
                rows = _compact_to_rows(lse, lay.ratio)  # (B, S, nq, hp, r)
                _scatter_rows(own, start, tokens, lay.ratio, rows.reshape(B, -1, *rows.shape[3:]))
            if own is not dense[i]:
                dense[i] = own[:, :, :H]
        weights = torch.nan_to_num(torch.softmax(dense, dim=0), nan=0.0).to(acc_dtype)

    # a first branch of ratio 1 covers every (token, head): in inference it writes the output (no zero fill),
    # the others add to it
    assign = lays[0].ratio == 1 and not (torch.is_grad_enabled() and qkv.requires_grad)
    out = (qkv.new_empty if assign else qkv.new_zeros)((B, L, H, d), dtype=acc_dtype)
    for i, (lay, pieces) in enumerate(zip(lays, results)):
        Hp, r = lay.padded_heads, lay.ratio
        target = out if Hp == H else qkv.new_zeros((B, L, Hp, d), dtype=acc_dtype)
        w = _pad_dim(weights[i], 2, Hp - H)
        for start, tokens, o, _ in pieces:
            rows = _compact_to_rows(o.to(acc_dtype), r)  # (B, S, nq, hp, d, r)
            _scatter_rows(target, start, tokens, r, rows.reshape(B, -1, *rows.shape[3:]),
                          _weight_rows(w, start, tokens, r), assign=assign and i == 0)
        if target is not out:
            out += target[:, :, :H]
    return out.to(qkv.dtype)


class DilatedSelfAttention(nn.Module):
    """Self-attention block of a LongNet layer: q/k/v projections, dilated attention, sub-LN, output projection.

    Parameter names follow the released checkpoint (``k_proj``, ``v_proj``, ``q_proj``, ``out_proj``,
    ``inner_attn_ln``; Xu et al. 2024, Methods: slide encoder (LongNet)).

    Args:
        embed_dim: E; num_heads: H (head width E / H).
        segment_lengths, dilated_ratios: the branches.
        layernorm_eps: eps of ``inner_attn_ln`` (1e-5 in the released model).
        segment_padding: ``"reference"`` | ``"masked"`` (see module doc).
        backend: attention kernel (``auto`` | ``fused`` | ``math`` | ``flash_attn``).
    """

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilated_ratios: Sequence[int],
                 layernorm_eps: float = 1e-5, segment_padding: SegmentPadding = "reference", backend: str = "auto"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.segment_lengths, self.dilated_ratios = list(segment_lengths), list(dilated_ratios)
        self.segment_padding, self.backend = segment_padding, backend
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.inner_attn_ln = nn.LayerNorm(embed_dim, eps=layernorm_eps)

    def _qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k, v projections stacked for one GEMM (same maths as applying them separately). Without
        autograd the stacked copy is cached until a parameter changes (in place, or by ``.to()``)."""
        params = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight,
                  self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)
        if torch.is_grad_enabled():
            self._qkv_cache = None
            return torch.cat(params[:3]), torch.cat(params[3:])
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cache = getattr(self, "_qkv_cache", None)
        if cache is None or cache[0] != key:
            cache = (key, torch.cat(params[:3]), torch.cat(params[3:]))
            self._qkv_cache = cache
        return cache[1], cache[2]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_qkv_cache", None)  # a derived copy: never pickled or deep-copied
        return state

    def forward(self, x: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        """x (B, L, E) -> (B, L, E).

        Args:
            lengths: per sequence, the number of leading valid tokens (the rest is padding, ignored as keys and
                given zero attention output); None = all L.
        """
        B, L, E = x.shape
        weight, bias = self._qkv_weight()
        qkv = F.linear(x, weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        kw = dict(segment_padding=self.segment_padding, backend=self.backend)
        if lengths is None or all(int(n) == L for n in lengths):
            attn = dilated_attention_qkv(qkv, self.segment_lengths, self.dilated_ratios, **kw)
        else:
            attn = qkv.new_zeros((B, L, self.num_heads, self.head_dim))
            for n in sorted({int(n) for n in lengths}):
                if n == 0:
                    continue
                rows = torch.tensor([i for i, m in enumerate(lengths) if int(m) == n], device=x.device)
                attn[rows, :n] = dilated_attention_qkv(qkv[rows, :n], self.segment_lengths, self.dilated_ratios,
                                                       **kw)
        attn = self.inner_attn_ln(attn.reshape(B, L, E))
        return self.out_proj(attn)
