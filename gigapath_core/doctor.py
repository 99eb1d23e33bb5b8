"""``gigapath doctor``: what is installed, which readers work, which device, which weights are offline."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
from typing import Any

PACKAGES = ["torch", "timm", "pluggy", "pydantic", "openslide-python", "openslide-bin", "pyvips", "tifffile",
            "imagecodecs", "h5py", "safetensors", "scikit-learn", "scipy", "transformers", "tiatoolbox", "ray"]


def _version(pkg: str) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def _unset_vars(source: str) -> list[str]:
    """The environment variables ``source`` names (``$VAR`` / ``${VAR}``) that are not set."""
    return [n for n in re.findall(r"\$\{?(\w+)\}?", source) if n not in os.environ]


def _weights_offline(sources: list[str]) -> str:
    """Which source (if any) resolves without the network, with the same routine the loader uses
    (:func:`gigapath_core.weights.resolve_source`, offline only: local files, then the Hugging Face cache).
    A source under an unset variable is named without a reason: the ``[environment]`` section says once that
    the variable is not set."""
    from .errors import WeightsError
    from .weights import resolve_source

    reasons = []
    for s in sources:
        if s == "random":
            return "random"
        if _unset_vars(s):
            reasons.append(s)
            continue
        try:
            path = resolve_source(s, offline_only=True)
        except WeightsError as err:
            reason = str(err).split(";")[0]
            reasons.append(reason if reason.startswith(("hf_hub:", s)) else f"{s}: {reason}")
            continue
        return f"{'cached' if s.startswith('hf_hub:') else 'local'} ({s}: {path})"
    if not sources:
        return "none declared (random)"
    return ("not available offline (runs with `weights: random`, as the quick start does): " + " | ".join(reasons))


def _environment(variables: set[str]) -> dict[str, str]:
    """``VAR -> value`` or why it matters when unset, for each variable the presets' weight sources name."""
    return {v: os.environ[v] if v in os.environ else
            f"not set: point it at a folder of downloaded weights (the ${{{v}}}/... paths under [weights]); until "
            f"then those sources are skipped" for v in sorted(variables)}


def _reader_status(plugin) -> str:
    """``usable`` or ``not usable: REASON`` (a reader whose library is missing is listed but cannot open files)."""
    check = getattr(plugin, "unavailable_reason", None)
    reason = check() if callable(check) else None
    return "usable" if not reason else f"not usable: {reason}"


def report() -> dict[str, Any]:
    import torch

    from . import __version__
    from .api import build, list_plugins
    from .presets import load_registry

    info: dict[str, Any] = {
        "gigapath": {"version": __version__, "python": platform.python_version(), "platform": platform.platform()},
        "packages": {p: _version(p) for p in PACKAGES},
        "torch": {"cuda_available": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                  "threads": torch.get_num_threads()},
        "slide_readers": {r["name"]: {"package": r["package"],
                                      "status": _reader_status(build("slide_reader", r["name"]))}
                          for r in list_plugins("slide_reader")},
        "environment": {},
        "weights": {},
    }
    variables = {"GIGAPATH_WEIGHTS"}
    for name, preset in load_registry().items():
        for kind in preset.kinds():
            comp = getattr(preset, kind)
            if comp.weights:
                info["weights"][f"{name}/{kind}"] = _weights_offline(comp.weights)
                variables.update(n for w in comp.weights for n in re.findall(r"\$\{?(\w+)\}?", w))
    info["environment"] = _environment(variables)
    return info
