"""Shared trainer for fine-tuning and self-supervised objectives: AdamW, layer-wise lr decay, warm-up + cosine,
gradient accumulation, mixed precision on CUDA, EMA, safetensors checkpoints with exact resume, seeds."""

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .ema import ema_update
from .optim import TrainConfig, build_optimizer, cosine_schedule, layerwise_param_groups
from .trainer import Trainer, seed_everything

__all__ = ["TrainConfig", "Trainer", "build_optimizer", "cosine_schedule", "ema_update", "latest_checkpoint",
           "layerwise_param_groups", "load_checkpoint", "save_checkpoint", "seed_everything"]
