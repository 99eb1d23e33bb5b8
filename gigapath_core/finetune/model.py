"""The fine-tuned model: optional slide encoder (frozen or trained) + task head, and its layer-wise lr decay ids.

Tile encoder frozen (the inputs are its saved tile embeddings); the slide encoder turns them into contextual
tile tokens and a slide embedding; the head pools the tokens (ABMIL) or reads the slide embedding (linear).
Without a slide encoder the head pools the tile embeddings directly (the "ABMIL only" ablation). Xu et al. 2024,
Methods: mutation prediction, cancer subtyping.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from ..kinds import SlideEncoder, TaskHead

_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")


class FeatureStandardizer(nn.Module):
    """``(x - mean) / std`` per feature dimension; ``mean``, ``std`` (D,) float32 buffers set by :meth:`fit`."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, batches) -> "FeatureStandardizer":
        """Set mean and std (ddof=0, floored at 1e-12) from an iterable of (N, D) arrays or tensors."""
        total = 0
        s1 = torch.zeros_like(self.mean, dtype=torch.float64)
        s2 = torch.zeros_like(self.mean, dtype=torch.float64)
        for x in batches:
            x = torch.as_tensor(x).reshape(-1, self.mean.numel()).double()
            total += x.shape[0]
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
        if total:
            mean = s1 / total
            self.mean.copy_(mean.float())
            self.std.copy_((s2 / total - mean * mean).clamp_min(0).sqrt().clamp_min(1e-12).float())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class SlideClassifier(nn.Module):
    """``forward(features (B, N, Din), coords (B, N, 2) grid px, padding_mask (B, N) bool) -> logits (B, C)``.

    Args:
        slide_encoder: a SlideEncoder or None.
        head: a TaskHead.
        freeze_encoder: no gradients through the slide encoder and keep it in eval mode (no dropout).
        standardize_dim: if set, tile features first go through a :class:`FeatureStandardizer` of that width.
    """

    def __init__(self, slide_encoder: SlideEncoder | None, head: TaskHead, freeze_encoder: bool = False,
                 standardize_dim: int | None = None):
        super().__init__()
        self.standardizer = FeatureStandardizer(standardize_dim) if standardize_dim else None
        self.slide_encoder = slide_encoder
        self.head = head
        self.freeze_encoder = bool(freeze_encoder and slide_encoder is not None)
        if self.freeze_encoder:
            for p in slide_encoder.parameters():
                p.requires_grad_(False)
        self.encoder_cache = None
        self._cache_fingerprint: str | None = None

    def use_encoder_cache(self, cache) -> None:
        """Reuse a frozen encoder's outputs from ``cache`` (a :class:`FrozenEncoderCache`) for calls with a
        ``cache_key``. Call after the weights are loaded and the standardizer is fit: both are fingerprinted
        now. Does nothing unless the encoder is frozen."""
        from .encoder_cache import module_fingerprint

        if not self.freeze_encoder or cache is None:
            self.encoder_cache, self._cache_fingerprint = None, None
            return
        self.encoder_cache = cache
        self._cache_fingerprint = module_fingerprint(self.slide_encoder, self.standardizer)

    def train(self, mode: bool = True) -> "SlideClassifier":
        super().train(mode)
        if self.freeze_encoder:
            self.slide_encoder.eval()
        return self

    def forward(self, features: torch.Tensor, coords: torch.Tensor,
                padding_mask: torch.Tensor | None = None, cache_key: str | None = None) -> torch.Tensor:
        """``cache_key``: identity of the whole slide in ``features`` (:func:`encoder_cache.slide_key`); with a
        frozen encoder and an attached cache its outputs are looked up / stored under it. Leave None for
        tile subsets."""
        if self.standardizer is not None:
            features = self.standardizer(features)
        if self.slide_encoder is None:
            tokens, slide = features, None
        else:
            slide, tokens = self._encode(features, coords, padding_mask, cache_key)
        return self.head(tokens, padding_mask, slide_embed=slide, tile_features=features)

    def _encode(self, features, coords, padding_mask, cache_key):
        if not self.freeze_encoder:
            return self.slide_encoder(features, coords, padding_mask, return_tile_tokens=True)
        cache = self.encoder_cache if cache_key is not None and padding_mask is None else None
        if cache is not None:
            from .encoder_cache import numeric_context

            key = (cache_key, self._cache_fingerprint, numeric_context(features.device))
            hit = cache.get(key, features.device)
            if hit is not None:
                return hit
        with torch.no_grad():
            slide, tokens = self.slide_encoder(features, coords, padding_mask, return_tile_tokens=True)
        if cache is not None:
            cache.put(key, slide, tokens)
        return slide, tokens

    def training_loss(self, task_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The head's :meth:`TaskHead.training_loss` (task loss plus any auxiliary term, e.g. CLAM's)."""
        return self.head.training_loss(task_loss, target)


def layer_ids(model: SlideClassifier) -> tuple[Callable[[str], int] | None, int | None]:
    """Layer ids for layer-wise lr decay (BEiT-style), found from parameter names.

    Trainable slide-encoder parameters named ``….layers.<i>.…`` or ``….blocks.<i>.…`` get id ``i + 1``; the
    ones registered before the first layer (input projection, tokens) get 0, the ones after the last (final
    norms) and the head get ``L + 1`` (lr × 1). With ``layer_decay`` d, layer ``i`` trains at ``lr × d^(L - i)``.
    Returns (None, None) if the model has no trainable layered encoder (LLRD then does nothing).
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("slide_encoder.")]
    idx = {n: int(m.group(1)) for n in names if (m := _LAYER.search(n))}
    if not idx:
        return None, None
    num = max(idx.values()) + 1
    order = {n: i for i, n in enumerate(names)}
    first = min(order[n] for n in idx)

    def layer_id(name: str) -> int:
        if name in idx:
            return idx[name] + 1
        if name in order:
            return 0 if order[name] < first else num + 1
        return num + 1

    return layer_id, num + 1
