"""Checkpoints: weights in safetensors, optimiser/scheduler/RNG state in a weights_only-loadable file.

Layout: ``<dir>/checkpoints/step_00000100/{model.safetensors, state.pt}``; a folder is written under a temporary
name and renamed, so a crash never leaves a half checkpoint. ``latest_checkpoint`` returns the newest complete one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(folder: str | Path, step: int, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep``. Returns its folder."""
    from safetensors.torch import save_model

    root = Path(folder) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        state = {
            "step": step,
            "optimizer": optimizer.state_dict() if optimizer else {},
            "scheduler": scheduler.state_dict() if scheduler else {},
            "scaler": scaler.state_dict() if scaler else {},
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": _numpy_rng_state(),
            "rng_python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64),
            "rng_python_gauss": random.getstate()[2],
            "extra": extra or {},
        }
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _numpy_rng_state() -> dict:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "cached_gaussian": cached}


def latest_checkpoint(folder: str | Path) -> Path | None:
    ckpts = sorted((Path(folder) / "checkpoints").glob("step_*"))
    ckpts = [c for c in ckpts if (c / "model.safetensors").is_file() and (c / "state.pt").is_file()]
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, scaler=None) -> dict:
    """Restore model (strict), optimiser, scheduler, scaler and RNG states. Returns the state dict (step, extra)."""
    from safetensors.torch import load_model

    path = Path(path)
    load_model(_unwrap(model), str(path / "model.safetensors"), strict=True)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if optimizer and state["optimizer"]:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler and state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    n = state["rng_numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    random.setstate((3, tuple(int(v) for v in state["rng_python"].tolist()), state.get("rng_python_gauss")))
    return state
