"""The shared training loop used by fine-tuning (task heads) and the SSL objectives.

A job supplies a model, a ``step_fn(model, batch) -> {"loss": tensor, ...}`` and a ``batches(epoch)`` factory
returning that epoch's micro-batches in a deterministic order (seeded by ``seed + epoch``). The trainer does
gradient accumulation, clipping, mixed precision on CUDA, the lr schedule, logging to ``train_log.jsonl``,
checkpoints and exact resume: a re-run with the same output folder continues after the last checkpoint,
skipping the micro-batches that checkpoint had already consumed.

Distributed: if ``torch.distributed`` is initialised (``torchrun``), the model is wrapped in DDP and only rank 0
writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .optim import TrainConfig, build_optimizer, cosine_schedule

log = logging.getLogger("gigapath")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Trainer:
    """Runs optimisation of ``model`` with ``cfg`` and writes into ``out_dir``.

    Args:
        model: the module to train (its trainable parameters form the optimiser groups).
        cfg: TrainConfig.
        out_dir: folder for ``checkpoints/`` and ``train_log.jsonl``.
        steps_per_epoch: micro-batches per epoch (for the schedule length).
        layer_id, num_layers: layer-wise lr decay (see optim.layerwise_param_groups).
        after_step: called after each optimiser step with (model, step) — e.g. an EMA teacher update.
        extra_state: callable returning a dict of tensors saved with checkpoints (e.g. a DINO centre), and
            ``load_extra`` restoring it.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path, steps_per_epoch: int,
                 layer_id: Callable[[str], int] | None = None, num_layers: int | None = None,
                 after_step: Callable[[nn.Module, int], None] | None = None,
                 extra_state: Callable[[], dict] | None = None, load_extra: Callable[[dict], None] | None = None):
        from ..pipeline import resolve_device

        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = cfg.max_steps or max(1, math.ceil(steps_per_epoch / cfg.grad_accum) * cfg.epochs)
        self.optimizer = build_optimizer(self.model, cfg, layer_id, num_layers)
        self.scheduler = cosine_schedule(self.optimizer, cfg.warmup_steps, self.total_steps,
                                         cfg.min_lr / cfg.lr if cfg.lr else 0.0)
        precision = cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.after_step, self.extra_state, self.load_extra = after_step, extra_state, load_extra
        self.step = 0
        self.micro = 0  # micro-batches consumed since the start of training
        self.history: list[dict[str, Any]] = []
        self.train_model = self._maybe_ddp(self.model)

    def _maybe_ddp(self, model: nn.Module) -> nn.Module:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        return model

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def resume(self) -> bool:
        """Load the newest checkpoint in ``out_dir`` if there is one. Returns True if resumed."""
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return False
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.scaler)
        self.step = int(state["step"])
        self.micro = int(state["extra"].get("micro", self.step * self.cfg.grad_accum))
        if self.load_extra:
            self.load_extra(state["extra"])
        log.info("resumed from %s (step %d)", ckpt, self.step)
        return True

    def save(self) -> Path | None:
        if not is_main_process():
            return None
        extra = {"micro": self.micro, **(self.extra_state() if self.extra_state else {})}
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                               extra, keep=self.cfg.keep_checkpoints)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "train_log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def fit(self, batches: Callable[[int], Iterable[Any]], step_fn: Callable[[nn.Module, Any], dict]) -> list[dict]:
        """Train until ``epochs`` or ``max_steps``; resumes automatically. Returns the per-step log rows."""
        from ..progress import make_progress

        seed_everything(self.cfg.seed)
        self.resume()
        accum = self.cfg.grad_accum
        self.train_model.train()
        with make_progress() as progress:
            task = progress.add_task("training", total=self.total_steps, completed=self.step,
                                     visible=self.cfg.progress and is_main_process())
            for epoch in range(self.micro // max(1, self.steps_per_epoch), self.cfg.epochs):
                if self.step >= self.total_steps:
                    break
                seed_everything(self.cfg.seed + epoch)
                skip = self.micro - epoch * self.steps_per_epoch
                losses: list[float] = []
                for i, batch in enumerate(batches(epoch)):
                    if i < skip:
                        continue
                    with self._autocast():
                        out = step_fn(self.train_model, batch)
                    loss = out["loss"]
                    self.scaler.scale(loss / accum).backward()
                    losses.append(float(loss.detach()))
                    self.micro += 1
                    end_of_epoch = i + 1 == self.steps_per_epoch
                    if self.micro % accum and not end_of_epoch:
                        continue
                    self._optimizer_step()
                    row = {"step": self.step, "epoch": epoch, "loss": float(np.mean(losses)),
                           "lr": self.optimizer.param_groups[0]["lr"],
                           **{k: float(v) for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.numel() == 1}}
                    losses = []
                    if self.step % self.cfg.log_every == 0:
                        self._log(row)
                    progress.update(task, completed=self.step, description=f"training loss {row['loss']:.4f}")
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                        self.save()
                    if self.step >= self.total_steps:
                        break
                if not self.cfg.checkpoint_every:
                    self.save()
        if self.cfg.checkpoint_every:
            self.save()
        return self.history

    def _optimizer_step(self) -> None:
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        if self.after_step:
            self.after_step(self.model, self.step)
