"""Weight sources: local files and folders, or a model hub; never unpickling untrusted data.

A source string is one of:

- ``random``: keep the random initialisation (outputs record ``weights_source = "random"``);
- a local file: ``.safetensors`` (preferred) or ``.bin``/``.pth``/``.pt`` (``torch.load(weights_only=True)``);
  ``~`` and ``$VARS`` are expanded; a source naming an unset variable is skipped;
- a local folder holding ``model.safetensors`` or ``pytorch_model.bin``;
- ``hf_hub:ORG/NAME`` or ``hf_hub:ORG/NAME/FILE``: downloaded with huggingface_hub (honours ``HF_TOKEN``,
  ``HF_HUB_OFFLINE`` and the local cache). When the hub is unreachable, :class:`WeightsError` says how to
  fetch the file elsewhere and point ``weights:`` at it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import WeightsError

log = logging.getLogger("gigapath")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
HUB_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")


def _expand(source: str) -> str | None:
    if re.search(r"\$\{?(\w+)\}?", source):
        names = re.findall(r"\$\{?(\w+)\}?", source)
        if any(n not in os.environ for n in names):
            return None
    return os.path.expanduser(os.path.expandvars(source))


def hub_download(spec: str) -> Path:
    """``ORG/NAME`` or ``ORG/NAME/FILE`` -> local path (cache or download)."""
    parts = spec.split("/")
    repo_id = "/".join(parts[:2])
    files = ["/".join(parts[2:])] if len(parts) > 2 else list(HUB_DEFAULT_FILES)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        raise WeightsError("hf_hub sources need huggingface_hub: pip install huggingface_hub") from None
    last: Exception | None = None
    for filename in files:
        try:
            return Path(hf_hub_download(repo_id, filename, token=os.environ.get("HF_TOKEN")))
        except Exception as err:  # offline, gated, missing file...
            last = err
    raise WeightsError(
        f"could not get {files[0]!r} from the Hugging Face hub repo {repo_id!r} "
        f"({type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}). "
        f"If the model is gated, accept its licence on huggingface.co and set HF_TOKEN; on an offline "
        f"machine, download it elsewhere (`hf download {repo_id} {files[0]}`), copy the file here and set "
        f"`weights: /path/to/{files[0]}`."
    )


def resolve_source(source: str) -> Path | None:
    """Source string -> local file path, or None for ``random`` / an unset variable."""
    if source == "random":
        return None
    if source.startswith("hf_hub:"):
        return hub_download(source[len("hf_hub:") :])
    expanded = _expand(source)
    if expanded is None:
        return None
    path = Path(expanded)
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"weights folder {path} holds none of {', '.join(FOLDER_FILES)}")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or torch.load(weights_only=True).

    Checkpoints saved as ``{"model": state_dict}`` or ``{"state_dict": state_dict}`` are unwrapped.
    Raises WeightsError if the file cannot be read or would need unpickling arbitrary objects.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read weights {path}: {type(err).__name__}: {err}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return sd


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(strict=True)`` with missing/unexpected/mis-shaped keys named in the error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or shapes:

        def few(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch {len(shapes)}: {few(shapes)}")
        raise WeightsError(f"weights {source} do not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def load_weights(module: nn.Module, sources: list[str]) -> str:
    """Try each source in order; load the first that resolves. Returns the source used (or ``"random"``).

    Calls ``module.load_weights(state_dict, source)`` so plugins can remap published layouts.
    Raises WeightsError if a source exists but fails, or if every non-random source failed.
    """
    if not sources or sources == ["random"]:
        log.warning("%s: weights: random (not pretrained)", type(module).__name__)
        return "random"
    errors = []
    for source in sources:
        if source == "random":
            log.warning("%s: weights: random (not pretrained)", type(module).__name__)
            return "random"
        try:
            path = resolve_source(source)
        except WeightsError as err:
            errors.append(str(err))
            continue
        if path is None:
            continue
        sd = read_state_dict(path)
        module.load_weights(sd, source)
        log.info("%s: loaded weights from %s", type(module).__name__, source)
        return source
    raise WeightsError("no weights source worked: " + " | ".join(errors or [f"tried {sources}"]))
