"""Linear classifier on a slide embedding (linear probe; the head of the ``mean`` and CLS-pooled baselines)."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from gigapath_core import hookimpl
from gigapath_core.kinds import PluginParams, TaskHead


class LinearHead(TaskHead):
    """Dropout + Linear on the slide embedding (B, D) -> logits (B, C)."""

    name = "linear"

    class Params(PluginParams):
        in_dim: int = Field(768, ge=1, description="width D of the slide embedding")
        num_classes: int = Field(2, ge=1, description="number of logits: 1 (binary), C (multi-class), L (multi-label)")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout before the linear layer")

    def __init__(self, in_dim=768, num_classes=2, dropout=0.0):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, tile_tokens=None, padding_mask=None, slide_embed=None, tile_features=None):
        """slide_embed (B, in_dim) -> logits (B, num_classes) float32. Raises ValueError without slide_embed."""
        if slide_embed is None:
            raise ValueError("the linear head needs a slide embedding (B, D): configure a slide encoder")
        return self.classifier(self.drop(slide_embed)).float()


@hookimpl
def gigapath_task_heads():
    return [LinearHead]
