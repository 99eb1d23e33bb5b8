"""Pretraining and zero-shot jobs: ``dinov2`` (tile encoder, Xu et al. 2024, Methods: tile encoder), ``mae_slide``
(slide encoder, Xu et al. 2024, Methods: slide encoder (LongNet)),
``clip`` (slide–report alignment, Xu et al. 2024, Methods: slide-level vision-language alignment) and ``zeroshot``
(MI-Zero prompts, Xu et al. 2024, Methods: slide-level vision-language alignment).

Each job builds an ``ssl_objective`` plugin, feeds it views of real data (tiles streamed by the tiler,
``tile_embeddings.h5`` of the embed job, slide–report pairs) through the shared
:class:`gigapath_core.training.Trainer` (AdamW, warm-up + cosine, safetensors checkpoints, exact resume) and
exports the trained encoder. See docs/pretraining.md.
"""

from .config import CLIPJobConfig, DINOv2JobConfig, EmbeddingsConfig, MAEJobConfig, ZeroShotConfig, ZeroShotJobConfig
from .data import ViewDataset, load_pairs, load_slide_embeddings

__all__ = [
    "CLIPJobConfig",
    "DINOv2JobConfig",
    "EmbeddingsConfig",
    "MAEJobConfig",
    "ViewDataset",
    "ZeroShotConfig",
    "ZeroShotJobConfig",
    "load_pairs",
    "load_slide_embeddings",
]
