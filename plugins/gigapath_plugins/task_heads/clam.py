"""CLAM heads (Lu et al., "Data-efficient and weakly supervised computational pathology on whole-slide images",
Nature Biomedical Engineering 5, 2021): CLAM-SB (one attention branch) and CLAM-MB (one branch per class), with the
instance-level clustering loss. Layer sizes follow the authors' ``models/model_clam.py`` (mahmoodlab/CLAM)::

    size "small": in_dim -> 512 -> 256; "big": in_dim -> 512 -> 384
    h   = Dropout(ReLU(Linear(in_dim, 512) x))                       (N, 512)
    a   = W_c (tanh(W_a h) * sigm(W_b h))                            (N, K) K = 1 (SB) or C (MB), gated attention
    A   = softmax over the N tiles of a^T                            (K, N)
    M   = A h                                                        (K, 512) slide representation(s)
    SB: logits = Linear(512, C)(M);  MB: logits_c = Linear_c(512, 1)(M_c)

Instance clustering (the paper's "instance-level clustering", ``inst_eval``/``inst_eval_out``): for the true class
c, the k tiles of highest attention (branch c for MB, the one branch for SB) are pseudo-labelled positive and the k
of lowest attention negative, and ``Linear_c(512, 2)`` is trained on them with cross-entropy; with ``subtyping``
the k highest-attended tiles of every other class's branch are pseudo-labelled negative for that class's
classifier, and the sum is divided by the number of classes. Training loss (CLAM main.py ``--bag_weight 0.7``,
``--B 8``)::

    loss = bag_weight * task_loss + (1 - bag_weight) * instance_loss

A binary task (one logit) uses two classes inside (negative, positive) and returns the log-odds
``l_pos - l_neg`` (CLAM-MB) or a single logit (CLAM-SB). k is capped at the number of tiles (CLAM's top-k would
fail on bags smaller than k). Multi-label tasks get no instance loss (CLAM defines none; logged once).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, TaskHead

log = logging.getLogger("gigapath")
SIZES = {"small": (512, 256), "big": (512, 384)}  # model_clam.py size_dict (after the input width)


class GatedAttention(nn.Module):
    """CLAM's ``Attn_Net_Gated``: (N, L) -> (N, K) attention logits ``W_c (tanh(W_a h) * sigm(W_b h))``."""

    def __init__(self, dim: int, hidden: int, branches: int, dropout: float):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h))


class CLAMSBHead(TaskHead):
    """CLAM-SB: single-branch gated attention MIL with instance-level clustering (Lu et al. 2021)."""

    name = "clam_sb"
    multi_branch = False

    class Params(PluginParams):
        in_dim: int = Field(768, ge=1, description="width of the tile tokens (filled in by finetune)")
        num_classes: int = Field(2, ge=1, description="number of logits (filled in by finetune)")
        size: Literal["small", "big"] = Field("small", description="hidden widths: small 512/256, big 512/384")
        dropout: float = Field(0.25, ge=0, lt=1, description="dropout after the first layer and in the attention")
        k_sample: int = Field(8, ge=1, description="tiles pseudo-labelled per class and side (CLAM --B)")
        bag_weight: float = Field(0.7, ge=0, le=1, description="weight of the slide-level loss (CLAM --bag_weight)")
        subtyping: bool = Field(False, description="also push other classes' top tiles to negative (CLAM --subtyping)")

    def __init__(self, in_dim=768, num_classes=2, size="small", dropout=0.25, k_sample=8, bag_weight=0.7,
                 subtyping=False):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.n_cls = max(num_classes, 2)  # a binary task (1 logit) has two classes for the instance classifiers
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        width, hidden = SIZES[size]
        branches = self.n_cls if self.multi_branch else 1
        self.fc = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout))
        self.attention_net = GatedAttention(width, hidden, branches, dropout)
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(width, 1) for _ in range(self.n_cls))
        else:
            self.classifiers = nn.Linear(width, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(width, 2) for _ in range(self.n_cls))
        self._last: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._warned = False

    # --------------------------------------------------------------------------------------------- forward
    def _one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, in_dim) -> logits (num_classes,), attention (K, N) softmaxed, h (N, 512)."""
        h = self.fc(x)
        attn = torch.softmax(self.attention_net(h).transpose(0, 1).float(), dim=1).to(h.dtype)  # (K, N)
        m = attn @ h  # (K, 512)
        if self.multi_branch:
            logits = torch.stack([clf(m[c]).squeeze(-1) for c, clf in enumerate(self.classifiers)])
            if self.num_classes == 1:
                logits = (logits[1] - logits[0]).reshape(1)
        else:
            logits = self.classifiers(m[0])
        return logits, attn, h

    def forward(self, tile_tokens, padding_mask=None, slide_embed=None, tile_features=None):
        """tile_tokens (B, N, in_dim), padding_mask (B, N) bool -> logits (B, num_classes) float32.

        Keeps each slide's attention and hidden tiles for :meth:`training_loss`. Raises ValueError if
        tile_tokens is missing."""
        if tile_tokens is None:
            raise ValueError(f"the {self.name} head needs tile tokens (B, N, D)")
        masks = padding_mask if padding_mask is not None else [None] * tile_tokens.shape[0]
        outs, self._last = [], []
        for t, msk in zip(tile_tokens, masks):
            logits, attn, h = self._one(t if msk is None else t[~msk])
            outs.append(logits)
            self._last.append((attn, h))
        return torch.stack(outs).float()

    # ----------------------------------------------------------------------------------- instance clustering
    def _labels(self, target: torch.Tensor) -> list[int] | None:
        if target.dtype == torch.long:
            return [int(t) for t in target.reshape(-1)]
        if target.shape[-1] == 1:  # binary: (B, 1) float
            return [int(t > 0.5) for t in target.reshape(-1)]
        return None  # multi-label

    def instance_loss(self, target: torch.Tensor) -> torch.Tensor | None:
        """CLAM's clustering loss on the last forward's slides (mean over the batch); None if not defined."""
        labels = self._labels(target)
        if labels is None:
            if not self._warned:
                log.warning("%s: no instance clustering loss for a multi-label task (CLAM defines none)", self.name)
                self._warned = True
            return None
        ce = nn.functional.cross_entropy
        total = []
        for (attn, h), label in zip(self._last, labels):
            k = min(self.k_sample, h.shape[0])
            loss = h.new_zeros(())
            for c, clf in enumerate(self.instance_classifiers):
                a = attn[c] if self.multi_branch else attn[0]
                top = torch.topk(a, k).indices
                if c == label:
                    bottom = torch.topk(-a, k).indices
                    x = torch.cat([h[top], h[bottom]])
                    y = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)])
                elif self.subtyping:
                    x, y = h[top], torch.zeros(k, dtype=torch.long)
                else:
                    continue
                loss = loss + ce(clf(x).float(), y.to(h.device))
            total.append(loss / self.n_cls if self.subtyping else loss)
        return torch.stack(total).mean()

    def training_loss(self, task_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``bag_weight * task_loss + (1 - bag_weight) * instance_loss`` (CLAM's training objective)."""
        inst = self.instance_loss(target) if self.training and self._last else None
        return task_loss if inst is None else self.bag_weight * task_loss + (1 - self.bag_weight) * inst


class CLAMMBHead(CLAMSBHead):
    """CLAM-MB: one gated-attention branch and one slide classifier per class (Lu et al. 2021)."""

    name = "clam_mb"
    multi_branch = True

    class Params(CLAMSBHead.Params):
        pass


@hookimpl
def gigapath_task_heads():
    return [CLAMSBHead, CLAMMBHead]
