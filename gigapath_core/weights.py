"""Weight sources: local files and folders, or a model hub; never unpickling untrusted data.

A source string is one of:

- ``random``: keep the random initialisation (outputs record ``weights_source = "random"``; a warning, or
  ``gigapath run``'s model summary line, says so once);
- a local file: ``.safetensors`` (preferred), ``.bin``/``.pth``/``.pt`` (``torch.load(weights_only=True)``,
  memory-mapped when the file allows it) or ``.npz`` (``numpy.load(allow_pickle=False)``); ``~`` and ``$VARS``
  are expanded; a source naming an unset variable is reported as such and the next source is tried;
- a local folder holding ``model.safetensors``, ``pytorch_model.bin`` or ``model.pth``, optionally with the
  ``config.json`` that timm (``architecture``, ``model_args``, ``pretrained_cfg``) or Hugging Face
  transformers (``model_type``, ``architectures``) writes beside its weights (what ``hf download ORG/NAME
  --local-dir DIR`` produces). The model checks that config against itself (``check_config``) and refuses
  weights made for another architecture, naming both;
- ``hf_hub:ORG/NAME`` or ``hf_hub:ORG/NAME/FILE``: fetched with huggingface_hub, as ``timm.create_model
  ("hf_hub:...")`` would (honours ``HF_TOKEN``, ``HF_HUB_OFFLINE`` and the local cache; ``config.json`` comes
  along when the repo has one). When the hub is unreachable or the repo is gated, :class:`WeightsError` says
  how to fetch the file elsewhere and point ``weights:`` at it.

Training checkpoints that wrap the weights (``{"model": ...}``, ``{"state_dict": ...}``, DINO's
``{"teacher": ..., "student": ..., "args": Namespace}``) are unwrapped; ``argparse.Namespace`` is the only
non-tensor class the restricted unpickler is allowed to rebuild (its attributes are themselves restricted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import WeightsError

log = logging.getLogger("gigapath")
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth")
HUB_DEFAULT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
#: keys under which training checkpoints keep the weights, tried in this order
WRAPPER_KEYS = ("model", "state_dict", "teacher")
SAFE_GLOBALS = [argparse.Namespace]
RANDOM_WARNING = "%s: weights: random (not pretrained); every output records weights_source=random"
_random_said_elsewhere = [0]  # > 0: load_weights does not log RANDOM_WARNING (see random_weights_said_elsewhere)


@contextlib.contextmanager
def random_weights_said_elsewhere():
    """Within the block, :func:`load_weights` does not log its "weights: random" warning: the caller says it
    once itself. ``gigapath run`` states each encoder's weights on one line before any slide (``tile encoder:
    ... with RANDOM weights``), and its pool workers and Ray actors, which build the same models again, stay
    quiet (:func:`random_weights_said_by_parent`), so a run says it once per model."""
    _random_said_elsewhere[0] += 1
    try:
        yield
    finally:
        _random_said_elsewhere[0] -= 1


def random_weights_said_by_parent() -> None:
    """For a worker process of a run (pool worker, Ray actor): never log the "weights: random" warning in this
    process; the run that started it has said it."""
    _random_said_elsewhere[0] += 1


def _warn_random(name: str) -> None:
    if not _random_said_elsewhere[0]:
        log.warning(RANDOM_WARNING, name)


def _expand(source: str) -> str | None:
    names = re.findall(r"\$\{?(\w+)\}?", source)
    if any(n not in os.environ for n in names):
        return None
    return os.path.expanduser(os.path.expandvars(source))


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _first_line(err: BaseException) -> str:
    """First line of an exception's message, without terminal colour codes (torch's unpickler adds them)."""
    text = _ANSI.sub("", str(err)).strip()
    return text.splitlines()[0] if text else ""


def _hub_cached(repo_id: str, files: list[str]) -> Path | None:
    """The first of ``files`` already in the local Hugging Face cache, or None (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        return None
    for filename in files:
        try:
            hit = try_to_load_from_cache(repo_id, filename)
        except Exception:
            continue
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def hub_reachable(timeout_s: float = 3.0) -> str | None:
    """None if the hub's host accepts a TCP connection within ``timeout_s``, else why not (offline mode set, no
    route, DNS failure...). Lets a hub source fail in seconds instead of minutes of HTTP retries (issue #12)."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover
        return "huggingface_hub is not installed"
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{host}:{port} cannot be reached ({type(err).__name__}: {_first_line(err) or 'no answer'})"


def _hub_spec(spec: str) -> tuple[str, list[str]]:
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise WeightsError(f"hf_hub:{spec}: expected hf_hub:ORG/NAME or hf_hub:ORG/NAME/FILE")
    return "/".join(parts[:2]), (["/".join(parts[2:])] if len(parts) > 2 else list(HUB_DEFAULT_FILES))


def hub_download(spec: str, offline_only: bool = False) -> Path:
    """``ORG/NAME`` or ``ORG/NAME/FILE`` -> local path of the weights file (cache or download).

    Tries ``model.safetensors`` then ``pytorch_model.bin`` unless FILE is given; also fetches ``config.json``
    into the same snapshot folder when the repo has one (for :func:`read_config`).

    The local cache is looked at first; when the file is not there and the hub cannot be reached (offline mode,
    no route: checked with one TCP connection, :func:`hub_reachable`), the error comes at once, without
    huggingface_hub's minutes of retries. ``offline_only=True`` never touches the network (``gigapath doctor``).

    Raises:
        WeightsError: offline and not cached, gated without a token, no such repo or file; the message says
            how to get the file onto this machine.
    """
    repo_id, files = _hub_spec(spec)
    how = (f"if the model is gated, accept its licence on https://huggingface.co/{repo_id} and set HF_TOKEN; on "
           f"an offline machine, download it elsewhere (`hf download {repo_id} {files[0]} config.json --local-dir "
           f"DIR`), copy it here and set `weights: /path/to/{files[0]}` (or the folder, or $GIGAPATH_WEIGHTS)")
    cached = _hub_cached(repo_id, files)
    if cached is not None:
        return cached
    why_not = "not looked up (offline check only)" if offline_only else hub_reachable()
    if why_not is not None:
        raise WeightsError(f"hf_hub:{repo_id}: {' or '.join(files)} is not in the local Hugging Face cache and the "
                           f"hub is not used: {why_not}; {how}")
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub comes with timm
        raise WeightsError("hf_hub sources need huggingface_hub: pip install huggingface_hub") from None
    token = os.environ.get("HF_TOKEN") or None
    path, reason = None, ""
    for filename in files:
        try:
            path = Path(hf_hub_download(repo_id, filename, token=token))
            break
        except GatedRepoError:
            raise WeightsError(f"hf_hub:{repo_id} is gated and HF_TOKEN is unset or not allowed: {how}") from None
        except RepositoryNotFoundError:
            raise WeightsError(f"hf_hub:{repo_id}: no such repository on the Hugging Face hub (or it is private "
                               f"and HF_TOKEN is not set)") from None
        except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError)
            reason = ("not in the local Hugging Face cache and the hub cannot be reached"
                      + (" (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""))
        except EntryNotFoundError:
            reason = f"the repo has no {filename}"
        except Exception as err:  # network errors, HTTP errors...
            reason = f"{type(err).__name__}: {_first_line(err)}"
    if path is None:
        raise WeightsError(f"could not get {' or '.join(files)} from hf_hub:{repo_id}: {reason}; {how}")
    try:  # best effort: the architecture record that timm/transformers keep beside the weights
        hf_hub_download(repo_id, CONFIG_FILE, token=token)
    except Exception:
        pass
    return path


def resolve_source(source: str, offline_only: bool = False) -> Path | None:
    """Source string -> local weights file, or None for ``random``. The one resolution routine, used by
    :func:`load_weights` and by ``gigapath doctor`` (with ``offline_only=True``: local files and the hub cache).

    Raises:
        WeightsError: a variable the source names is unset, the file or folder does not exist, a folder holds no
            weights file, or the hub failed (the message says why and how to get the file).
    """
    if source == "random":
        return None
    if source.startswith("hf_hub:"):
        return hub_download(source[len("hf_hub:"):], offline_only=offline_only)
    expanded = _expand(source)
    if expanded is None:
        unset = [n for n in re.findall(r"\$\{?(\w+)\}?", source) if n not in os.environ]
        raise WeightsError(f"{source}: ${unset[0]} is not set (point it at a folder of downloaded weights)")
    path = Path(expanded)
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        extra = f" (it has a {CONFIG_FILE} but no weights beside it)" if (path / CONFIG_FILE).is_file() else ""
        raise WeightsError(f"weights folder {path} holds none of {', '.join(FOLDER_FILES)}{extra}")
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    return path


def read_config(weights_path: str | Path) -> dict[str, Any] | None:
    """The ``config.json`` beside a weights file (timm or transformers layout), or None if there is none.

    Raises WeightsError if the file exists but is not a JSON object.
    """
    cfg_path = Path(weights_path).parent / CONFIG_FILE
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"cannot read {cfg_path}: {type(err).__name__}: {_first_line(err)}") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{cfg_path}: expected a JSON object")
    return cfg


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:  # memory-map zip-format checkpoints: a 4.5 GB ViT-g file is not copied into RAM
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, npz (no pickles), or torch.load(weights_only=True).

    Checkpoints saved as ``{"model": sd}``, ``{"state_dict": sd}`` or DINO's ``{"teacher": sd, ...}`` are
    unwrapped. Returns name -> tensor.

    Raises:
        WeightsError: the file cannot be read, would need unpickling arbitrary objects, or holds no state dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        elif path.suffix == ".npz":
            import numpy as np

            with np.load(str(path), allow_pickle=False) as npz:
                sd = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        else:
            sd = _torch_load(path)
    except Exception as err:
        hint = ""
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            hint = (f" (it pickles {found.group(1) if found else 'Python objects'}, which is refused for safety; "
                    f"if you trust the file, convert it once to .safetensors with a script of your own)")
        raise WeightsError(f"cannot read weights {path}: {type(err).__name__}: {_first_line(err)}{hint}") from None
    for key in WRAPPER_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict (name -> tensor)")
    return sd


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(strict=True)`` with missing/unexpected/mis-shaped keys named in the error.

    Raises:
        WeightsError: ``weights SOURCE do not match CLASS: missing N: k1, k2...; unexpected M: ...;
            shape mismatch K: key: checkpoint (..) vs model (..)``.
    """
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


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove any of ``prefixes`` (repeatedly, e.g. ``module.backbone.``) from the start of every key."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_weights(module: nn.Module, sources: list[str]) -> str:
    """Try each source in order; load the first that resolves. Returns the source used (or ``"random"``).

    Calls ``module.check_config(config, source)`` when a ``config.json`` sits beside the weights and the module
    defines it, then ``module.load_weights(state_dict, source)`` so plugins can remap published layouts.

    Raises:
        WeightsError: a source exists but fails (unreadable, wrong architecture, key mismatch), or every
            non-random source failed (each reason listed).
    """
    name = type(module).__name__
    if not sources or sources == ["random"]:
        _warn_random(name)
        return "random"
    errors = []
    for source in sources:
        if source == "random":
            _warn_random(name)
            return "random"
        try:
            path = resolve_source(source)
        except WeightsError as err:
            errors.append(str(err))
            continue
        assert path is not None
        config = read_config(path)
        if config is not None and hasattr(module, "check_config"):
            module.check_config(config, source)
        sd = read_state_dict(path)
        module.load_weights(sd, source)
        log.info("%s: loaded weights from %s (%s)", name, source, path)
        return source
    raise WeightsError(f"no weights source worked for {name} (tried {len(sources)}, in order): "
                       + " | ".join(f"{i + 1}. {e}" for i, e in enumerate(errors))
                       + "; or set `weights: random` for a run with random weights")
