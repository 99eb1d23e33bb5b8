"""Distributed training under ``torchrun`` (torch.distributed, DDP): process-group set-up, this rank's device,
rank-0-only helpers, and the rank share of a job's data.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each process;
:func:`init_distributed` reads them (``env://``) and starts the process group with ``nccl`` when CUDA is
available and ``gloo`` otherwise. Without those variables everything here is a no-op for a single process.

The shared :class:`~gigapath_core.training.Trainer` calls :func:`init_distributed` itself, wraps the model in
``DistributedDataParallel`` and gives each rank every ``world_size``-th micro-batch of the job's
``batches(epoch)`` (rank-strided), so a job runs unchanged under ``torchrun`` with the same global batch.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger("gigapath")
T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when this process was started by ``torchrun`` (or another ``env://`` launcher) with > 1 process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes checkpoints, logs and reports."""
    return get_rank() == 0


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Start the process group from torchrun's environment, once. Returns True if running distributed.

    Args:
        backend: ``auto`` (``nccl`` if CUDA is available, else ``gloo``), ``nccl`` or ``gloo``.
        timeout_s: collective timeout, seconds.
    On ranks other than 0, progress bars and console output are silenced and logging shows warnings only.
    """
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://",
                              "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)  # binds the communicator to this GPU
    try:
        dist.init_process_group(**kwargs)
    except TypeError:  # torch < 2.3 has no device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    if dist.get_rank() != 0:
        _quiet()
    log.info("torch.distributed: rank %d of %d (local rank %d), backend %s", dist.get_rank(),
             dist.get_world_size(), local_rank, backend)
    return True


def _quiet() -> None:
    os.environ["GIGAPATH_PROGRESS"] = "0"
    logging.getLogger("gigapath").setLevel(logging.WARNING)
    try:
        from ..progress import console

        console.quiet = True
    except ImportError:  # pragma: no cover
        pass


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` without an index -> this rank's GPU (``cuda:LOCAL_RANK``) when distributed; else unchanged."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", get_local_rank() if is_initialized() else torch.cuda.current_device())
    return device


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over ranks (the value itself in a single process). Every rank must call it."""
    if not is_initialized():
        return float(value)
    backend_cuda = dist.get_backend() == "nccl"
    t = torch.as_tensor(float(value), dtype=torch.float64,
                        device=torch.device("cuda", torch.cuda.current_device()) if backend_cuda else "cpu")
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def rank_share(items: Sequence[T], drop_last: bool = True) -> list[T]:
    """This rank's items: positions ``rank, rank + W, ...``. With ``drop_last`` the tail that would leave the
    ranks with unequal counts is dropped (every rank must run the same number of steps)."""
    w, r = get_world_size(), get_rank()
    n = (len(items) // w) * w if drop_last else len(items)
    return list(items[r:n:w])


def distributed_sampler(dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
    """``torch.utils.data.DistributedSampler`` for this rank (or None in a single process). Call
    ``sampler.set_epoch(epoch)`` each epoch for a new shuffle."""
    if not is_initialized():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def cleanup() -> None:
    """Destroy the process group (end of a torchrun job)."""
    if is_initialized():
        dist.destroy_process_group()
