"""The shared training loop used by fine-tuning (task heads) and the SSL objectives.

A job supplies a model, a ``step_fn(model, batch) -> {"loss": tensor, ...}`` and a ``batches(epoch)`` factory
returning that epoch's micro-batches in a deterministic order (seeded by ``seed + epoch``). The trainer does
gradient accumulation, clipping, mixed precision on CUDA, the lr schedule, logging to ``train_log.jsonl``,
checkpoints and exact resume: a re-run with the same output folder continues after the last checkpoint,
skipping the micro-batches that checkpoint had already consumed.

Distributed (see :mod:`gigapath_core.training.distributed`): under ``torchrun`` the trainer starts the process
group (``nccl`` on GPU, ``gloo`` on CPU), wraps the model in DDP on ``cuda:LOCAL_RANK`` (or the CPU), and gives
rank ``r`` of ``W`` the micro-batches ``r, r + W, ...`` of ``batches(epoch)``, accumulating ``grad_accum / W`` of
them per optimiser step, so one step sees the same global batch as a single process with ``grad_accum``
micro-batches (gradients are averaged by DDP; no all-reduce on accumulation micro-batches). Only rank 0 writes
checkpoints and ``train_log.jsonl`` (the loss it logs is the mean over ranks); every rank resumes from the same
checkpoint. Jobs whose ``batches`` already yield this rank's share pass ``shard_batches=False``.

Random draws (see :mod:`gigapath_core.training.rng`): each micro-batch runs (loading, forward and backward)
inside :func:`~gigapath_core.training.rng.keyed_rng` seeded from ``(seed, epoch, i)``, ``i`` its position in
``batches(epoch)``; dropout, drop-path and any draw from torch's, numpy's or Python's global generators are then
the same on 1 or N ranks and after a resume. A micro-batch may be yielded as a zero-argument callable (e.g.
``functools.partial(load, k)``): the trainer calls it only on the rank that trains on it, inside that scope, so
ranks (and a resumed run skipping consumed micro-batches) do not load data they do not use. With
``shard_batches=False`` the key of this rank's ``i``-th micro-batch is ``i * W + r`` (its position in a
:func:`~gigapath_core.training.distributed.rank_share` of one list), so ranks never share a mask.
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

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import is_main_process
from .optim import TrainConfig, build_optimizer, cosine_schedule
from .rng import keyed_rng, micro_batch_seed

log = logging.getLogger("gigapath")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        shard_batches: under torchrun, give each rank every ``world_size``-th micro-batch (default); False when
            the job's ``batches(epoch)`` already yields only this rank's share.
        find_unused_parameters: passed to DDP (needed when some trainable parameters get no gradient).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path, steps_per_epoch: int,
                 layer_id: Callable[[str], int] | None = None, num_layers: int | None = None,
                 after_step: Callable[[nn.Module, int], None] | None = None,
                 extra_state: Callable[[], dict] | None = None, load_extra: Callable[[dict], None] | None = None,
                 shard_batches: bool = True, find_unused_parameters: bool = False):
        from ..pipeline import resolve_device

        distributed.init_distributed()
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.device = distributed.rank_device(resolve_device(cfg.device))
        self.model = model.to(self.device)
        self.steps_per_epoch = steps_per_epoch
        self._plan_ranks(shard_batches)
        self.total_steps = cfg.max_steps or max(
            1, math.ceil(self._usable // self._stride / self._accum) * cfg.epochs)
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
        self.train_model = self._maybe_ddp(self.model, find_unused_parameters)

    def _plan_ranks(self, shard_batches: bool) -> None:
        """Micro-batch stride, per-rank accumulation and micro-batches used per epoch (see module docstring)."""
        world = distributed.get_world_size()
        self._ddp = world > 1
        self._stride = world if (self._ddp and shard_batches) else 1
        self._rank = distributed.get_rank() if self._stride > 1 else 0
        # global index of this rank's i-th micro-batch when the job shards itself (rank_share order: r, r+W, ...)
        own_share = self._ddp and not shard_batches
        self._key_mul, self._key_add = (world, distributed.get_rank()) if own_share else (1, 0)
        self._usable = (self.steps_per_epoch // self._stride) * self._stride
        self._accum = max(1, self.cfg.grad_accum // self._stride) if self._stride > 1 else self.cfg.grad_accum
        if self._stride > 1 and self.cfg.grad_accum % self._stride:
            log.warning("grad_accum %d is not a multiple of the %d ranks: each optimiser step sees %d micro-batches "
                        "(not %d)", self.cfg.grad_accum, world, self._accum * world, self.cfg.grad_accum)
        if self._usable < self.steps_per_epoch and is_main_process():
            log.warning("%d micro-batches per epoch over %d ranks: the last %d of each epoch are skipped so every "
                        "rank runs the same number of steps", self.steps_per_epoch, world,
                        self.steps_per_epoch - self._usable)
        if self._usable == 0 and self._stride > 1:
            from ..errors import ConfigError

            raise ConfigError("train", f"{self.steps_per_epoch} micro-batches per epoch cannot be shared by "
                                       f"{world} ranks (fewer micro-batches than ranks)")

    def _maybe_ddp(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        if not self._ddp:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=find_unused_parameters)

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

    def _trim_log(self) -> None:
        """Drop the rows of ``train_log.jsonl`` past the resume point (``step > self.step``: logged by a run
        that stopped before its next checkpoint, and logged again now), so each step appears once."""
        path = self.out_dir / "train_log.jsonl"
        if not is_main_process() or not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                ok = int(json.loads(line)["step"]) <= self.step
            except (ValueError, KeyError, TypeError):
                ok = False  # a line cut by a crash
            kept.append(line) if ok else None
            dropped += not ok
        if dropped:
            from ..store import write_bytes

            write_bytes(path, "".join(x + "\n" for x in kept).encode())
            log.info("train_log.jsonl: dropped %d row(s) past the resume point (step %d)", dropped, self.step)

    def fit(self, batches: Callable[[int], Iterable[Any]], step_fn: Callable[[nn.Module, Any], dict]) -> list[dict]:
        """Train until ``epochs`` or ``max_steps``; resumes automatically. Returns the per-step log rows."""
        from ..progress import make_progress

        seed_everything(self.cfg.seed)
        self.resume()
        self._trim_log()
        distributed.barrier()  # every rank has read the checkpoint before rank 0 may rotate it
        accum, stride, per_epoch = self._accum, self._stride, self.steps_per_epoch
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
                    if i >= self._usable:
                        break
                    if i < skip or i % stride != self._rank:
                        continue
                    j = i // stride  # this rank's micro-batch index in the epoch
                    end_of_epoch = (j + 1) * stride >= self._usable
                    will_step = (j + 1) % accum == 0 or end_of_epoch
                    # DDP: all-reduce gradients only on the micro-batch that ends an accumulation
                    sync = self.train_model.no_sync() if self._ddp and not will_step else contextlib.nullcontext()
                    # random draws keyed to the global micro-batch, not to this process's stream
                    key = micro_batch_seed(self.cfg.seed, epoch, i * self._key_mul + self._key_add)
                    with keyed_rng(key, self.device), sync:
                        if callable(batch):
                            batch = batch()
                        with self._autocast():
                            out = step_fn(self.train_model, batch)
                        loss = out["loss"]
                        self.scaler.scale(loss / accum).backward()
                    losses.append(float(loss.detach()))
                    # position in global micro-batches (the same on every rank; independent of the world size)
                    self.micro = epoch * per_epoch + (per_epoch if end_of_epoch else (j + 1) * stride)
                    if not will_step:
                        continue
                    self._optimizer_step()
                    mean_loss = distributed.all_reduce_mean(np.mean(losses)) if self._ddp else float(np.mean(losses))
                    row = {"step": self.step, "epoch": epoch, "loss": mean_loss,
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
        distributed.barrier()  # rank 0 has written the last checkpoint before any rank moves on
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
