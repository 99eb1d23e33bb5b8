"""Slide–report contrastive alignment (Prov-GigaPath "vision–language alignment", Xu et al. 2024, Methods: slide-level
vision-language alignment; CLIP: Radford
et al., ICML 2021).

Slide tower: a ``slide_encoder`` plugin (LongNet by default) + linear projection; text tower: a
``text_encoder`` plugin (PubMedBERT by default; any BERT-family model) + linear projection. Both embeddings
are L2-normalised; logits = ``exp(t) * slide @ text.T`` with a learnable temperature ``t`` (initialised to
``log(1 / 0.07)``, clamped to ``log(100)``); loss = mean of the slide->text and text->slide cross-entropies
(symmetric InfoNCE), each pair's own report being the positive.

Data view (``data = "pairs"``): ``{"features": (N, Din), "coords": (N, 2), "text": str}``; reports should be
cleaned before (``report_cleaner`` plugins; the pretraining job does it).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, SSLObjective

from .slide_views import pad_slides, subsample


def clip_loss(slide: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE: ``(CE(scale * S T^T, I) + CE(scale * T S^T, I)) / 2`` for (B, P) L2-normalised
    slide and text embeddings, the i-th report being the positive of the i-th slide."""
    logits = scale * slide @ text.T
    target = torch.arange(len(slide), device=slide.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


class SlideReportCLIP(SSLObjective):
    """CLIP between a slide encoder (+ projection) and a BERT-family text tower (+ projection)."""

    name = "clip"
    data = "pairs"

    class Params(PluginParams):
        slide_encoder: str = Field("longnet", description="slide_encoder plugin or preset")
        slide_encoder_params: dict[str, Any] = Field(default_factory=dict)
        slide_encoder_weights: str | list[str] | None = Field(None, description="None = the preset's")
        text_encoder: str = Field("pubmedbert", description="text_encoder plugin or preset")
        text_encoder_params: dict[str, Any] = Field(default_factory=dict)
        proj_dim: int = Field(512, ge=1, description="joint embedding width")
        init_temperature: float = Field(0.07, gt=0, description="initial softmax temperature")
        max_logit_scale: float = Field(100.0, gt=1)
        freeze_text: bool = Field(False, description="keep the text tower fixed (train its projection only)")
        freeze_slide: bool = Field(False, description="keep the slide encoder fixed (train its projection only)")
        max_tiles: int | None = Field(None, ge=1, description="random tile subset per training view (memory)")

    @classmethod
    def from_params(cls, params):
        return cls(params)

    def __init__(self, params: "SlideReportCLIP.Params"):
        super().__init__()
        from gigapath_core.api import build

        p = self.p = params
        self.slide_encoder = build(
            "slide_encoder", p.slide_encoder, weights=p.slide_encoder_weights, **p.slide_encoder_params
        )
        self.text_encoder = build("text_encoder", p.text_encoder, **p.text_encoder_params)
        self.slide_proj = nn.Linear(int(self.slide_encoder.embed_dim), p.proj_dim, bias=False)
        self.text_proj = nn.Linear(int(self.text_encoder.embed_dim), p.proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / p.init_temperature)))
        for tower, frozen in ((self.text_encoder, p.freeze_text), (self.slide_encoder, p.freeze_slide)):
            for q in tower.parameters():
                q.requires_grad_(not frozen)

    # ------------------------------------------------------------------------------------------ protocol
    def view(self, sample: dict, rng: np.random.Generator) -> dict:
        """Pair -> (optionally tile-subsampled) pair; ``features`` (M, Din), ``coords`` (M, 2), ``text``."""
        keep = subsample(len(sample["features"]), self.p.max_tiles if self.training else None, rng)
        return {
            "features": torch.as_tensor(np.asarray(sample["features"], dtype=np.float32)[keep]),
            "coords": torch.as_tensor(np.asarray(sample["coords"], dtype=np.float32)[keep]),
            "text": str(sample["text"]),
        }

    def collate(self, views: list[dict]) -> dict:
        batch = pad_slides(views, ("features", "coords"))
        batch["text"] = [v["text"] for v in views]
        return batch

    # ------------------------------------------------------------------------------------------ towers
    def encode_slides(
        self, features: torch.Tensor, coords: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N, Din) tile embeddings + (B, N, 2) grid px -> (B, proj_dim) L2-normalised slide embeddings."""
        dev = self.logit_scale.device
        if padding_mask is not None and not bool(padding_mask.any()):
            padding_mask = None
        emb = self.slide_encoder(
            features.to(dev).float(),
            coords.to(dev).float(),
            padding_mask=None if padding_mask is None else padding_mask.to(dev),
        )
        return F.normalize(self.slide_proj(emb.float()), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """B strings -> (B, proj_dim) L2-normalised text embeddings."""
        return F.normalize(self.text_proj(self.text_encoder(list(texts)).float()), dim=-1)

    def scale(self) -> torch.Tensor:
        """exp(t), clamped to ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.p.max_logit_scale)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss": symmetric InfoNCE, "logit_scale", "acc_slide_to_text"} for B >= 2 pairs."""
        s = self.encode_slides(batch["features"], batch["coords"], batch.get("padding_mask"))
        t = self.encode_texts(batch["text"])
        scale = self.scale()
        loss = clip_loss(s, t, scale)
        acc = ((s @ t.T).argmax(1) == torch.arange(len(s), device=s.device)).float().mean()
        return {"loss": loss, "logit_scale": scale.detach(), "acc_slide_to_text": acc}


@hookimpl
def gigapath_ssl_objectives():
    return [SlideReportCLIP]
