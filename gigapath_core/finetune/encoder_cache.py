"""Run-level in-memory cache of a frozen slide encoder's outputs (issue #16.5).

A frozen slide encoder (``model.slide_encoder.freeze: true``) in eval mode is a fixed function of its input, so
its outputs — the slide embedding (1, E) and the contextual tile tokens (1, N, E) that the head consumes — are
computed once per slide per run and reused by every epoch, every fold and, in an ablation, every variant that
uses the same encoder on the same tile features.

A cache entry is keyed by

- the slide: its tile-feature file (resolved path, size, mtime) and read options — two variants reading the same
  slide id from different embedding folders never share an entry;
- the encoder: a hash of its class, its weights and buffers (so a randomly initialised encoder, re-drawn per
  fold, is cached per fold) and of the feature standardizer's mean/std (fit per fold);
- the numeric context: device type and autocast dtype.

Only whole slides are cached: a training step on a random ``data.max_tiles`` subset of a larger slide runs the
encoder (its tokens depend on the other tiles of the subset). Entries live on the CPU; the cache stops adding
entries once it holds ``max_bytes`` (keep-first: with the cyclic access of epochs, evicting would only thrash).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn


def module_fingerprint(*modules: nn.Module | None) -> str:
    """sha1 (16 hex) of the modules' class names and every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha1()
    for m in modules:
        if m is None:
            h.update(b"none;")
            continue
        h.update(f"{type(m).__module__}.{type(m).__qualname__};".encode())
        for name, t in m.state_dict().items():
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def slide_key(path: str | Path, read_options: dict | None = None) -> str:
    """Identity of one slide's tile features: resolved file path, size, mtime (ns) and the read options."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}|{st.st_size}|{st.st_mtime_ns}|{sorted((read_options or {}).items())}"


def numeric_context(device: torch.device) -> str:
    """Device type and autocast dtype in force (``fp32`` when autocast is off)."""
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return f"{kind}:{torch.get_autocast_dtype(kind)}"
    return f"{kind}:fp32"


@dataclass
class FrozenEncoderCache:
    """Slide-encoder outputs by (slide key, encoder fingerprint, numeric context).

    Attributes:
        max_bytes: stop adding entries above this many bytes (0 disables the cache).
        hits, misses: lookups answered from the cache / that ran the encoder (for logs and tests).
    """

    max_bytes: int = 4 << 30
    hits: int = 0
    misses: int = 0
    nbytes: int = 0
    _store: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self._store)

    def get(self, key: tuple, device: torch.device):
        """(slide_embed or None, tokens) on ``device``, or None if not cached."""
        hit = self._store.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        return tuple(None if t is None else t.to(device, non_blocking=True) for t in hit)

    def put(self, key: tuple, slide: torch.Tensor | None, tokens: torch.Tensor) -> None:
        """Keep detached CPU copies (normal tensors even if computed under inference mode) while under budget."""
        size = tokens.numel() * tokens.element_size() + (0 if slide is None else slide.numel() * slide.element_size())
        if key in self._store or self.nbytes + size > self.max_bytes:
            return
        with torch.inference_mode(False):
            entry = tuple(None if t is None else t.detach().to("cpu").clone() for t in (slide, tokens))
        self._store[key] = entry
        self.nbytes += size
