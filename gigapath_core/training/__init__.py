"""Shared trainer for fine-tuning and self-supervised objectives: AdamW, layer-wise lr decay, warm-up + cosine,
gradient accumulation, mixed precision on CUDA, EMA, safetensors checkpoints with exact resume, seeds, and random
streams keyed to the micro-batch (the same on any number of ranks)."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .ema import ema_update
from .optim import TrainConfig, build_optimizer, cosine_schedule, layerwise_param_groups
from .rng import keyed_rng, micro_batch_seed
from .trainer import Trainer, seed_everything

__all__ = ["TrainConfig", "Trainer", "build_optimizer", "cosine_schedule", "ema_update", "keyed_rng",
           "latest_checkpoint", "layerwise_param_groups", "load_checkpoint", "micro_batch_seed", "save_checkpoint",
           "seed_everything"]
