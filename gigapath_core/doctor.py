"""``gigapath doctor``: what is installed, which readers work, which device, which weights are offline."""

from __future__ import annotations

import importlib.metadata as md
import platform
from typing import Any

PACKAGES = ["torch", "timm", "pluggy", "pydantic", "openslide-python", "openslide-bin", "pyvips", "tifffile",
            "imagecodecs", "h5py", "safetensors", "scikit-learn", "scipy", "transformers", "tiatoolbox", "ray"]


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def _weights_offline(sources: list[str]) -> str:
    """Which source (if any) resolves without the network."""
    import os

    from .weights import resolve_source

    for s in sources:
        if s == "random":
            return "random"
        if s.startswith("hf_hub:"):
            try:
                from huggingface_hub import try_to_load_from_cache

                parts = s[7:].split("/")
                fname = "/".join(parts[2:]) or "pytorch_model.bin"
                hit = try_to_load_from_cache("/".join(parts[:2]), fname)
                if isinstance(hit, str) and os.path.exists(hit):
                    return f"cached ({s})"
            except Exception:
                pass
            continue
        try:
            if resolve_source(s) is not None:
                return f"local ({s})"
        except Exception:
            continue
    return "not available offline" if sources else "none declared (random)"


def report() -> dict[str, Any]:
    import torch

    from . import __version__
    from .api import list_plugins
    from .presets import load_registry

    info: dict[str, Any] = {
        "gigapath": {"version": __version__, "python": platform.python_version(), "platform": platform.platform()},
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": {"cuda_available": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "threads": torch.get_num_threads()},
        "slide_readers": {r["name"]: r["package"] for r in list_plugins("slide_reader")},
        "weights": {},
    }
    for name, preset in load_registry().items():
        for kind in preset.kinds():
            comp = getattr(preset, kind)
            if comp.weights:
                info["weights"][f"{name}/{kind}"] = _weights_offline(comp.weights)
    return info
