"""Named presets (model cards) from ``registry.yaml`` files.

A registry file maps preset name -> card::

    presets:
      prov-gigapath:
        description: ...
        licence: ...
        citation: ...
        tile_encoder:    {plugin: dinov2_vit, params: {...}, weights: [hf_hub:...], embed_dim: 1536}
        slide_encoder:   {plugin: longnet, params: {...}, weights: [...], embed_dim: 768}

Files are read in this order, later ones overriding earlier presets of the same name: the bundled
``registry.yaml`` at the project root, each path in the ``GIGAPATH_REGISTRY`` environment variable
(``os.pathsep``-separated), then files passed to :func:`load_registry` (a pipeline config's ``registry:``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError, pydantic_message
from .hookspecs import KINDS
from .yaml_load import load_yaml

BUNDLED_REGISTRY = Path(__file__).resolve().parent.parent / "registry.yaml"


class PresetComponent(BaseModel):
    """One model of a preset: which plugin, with which params and weights."""

    model_config = ConfigDict(extra="forbid")
    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    weights: list[str] = Field(default_factory=list, description="sources tried in order; 'random' allowed")
    embed_dim: int | None = None
    params_count: int | None = Field(None, ge=0, description="parameters of the model as built (exact)")
    mpp: float | None = Field(None, gt=0, description="µm/px of the tiles the model was trained on / expects")
    embedding_rule: str = Field("", description="how the embedding is read out, e.g. 'CLS token'")


class Preset(BaseModel):
    """A model card. ``source`` lists where each number was read (URLs, repo paths); ``gated``: the weights
    need an accepted licence / access request on the hub (None: not applicable or unknown)."""

    model_config = ConfigDict(extra="forbid")
    description: str = ""
    licence: str = ""
    citation: str = ""
    source: str = ""
    gated: bool | None = None
    source_file: str = ""
    slide_reader: PresetComponent | None = None
    tiler: PresetComponent | None = None
    tile_encoder: PresetComponent | None = None
    slide_encoder: PresetComponent | None = None
    task_head: PresetComponent | None = None
    ssl_objective: PresetComponent | None = None
    text_encoder: PresetComponent | None = None
    report_cleaner: PresetComponent | None = None

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) is not None]


def _error_path(err: ValidationError, prefix: str) -> ConfigError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
    return ConfigError(loc, pydantic_message(e))


def read_registry_file(path: str | Path) -> dict[str, Preset]:
    """Parse one registry file. Raises ConfigError naming the file and key path."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(), str(path)) or {}  # within the alias budget (docs/promises.md)
    except FileNotFoundError:
        raise ConfigError("registry", f"registry file not found: {path}") from None
    except ConfigError as err:  # not valid YAML, or over the budget
        raise ConfigError("registry", str(err)) from None
    if not isinstance(raw, dict) or set(raw) - {"presets"}:
        raise ConfigError("registry", f"{path}: expected a mapping with the single key 'presets'")
    presets = {}
    for name, card in (raw.get("presets") or {}).items():
        try:
            presets[name] = Preset(**card, source_file=str(path))
        except ValidationError as err:
            raise _error_path(err, f"{path}:presets.{name}") from None
        except TypeError:
            raise ConfigError(f"{path}:presets.{name}", "expected a mapping") from None
    return presets


@lru_cache(maxsize=8)
def _load(extra: tuple[str, ...]) -> dict[str, Preset]:
    files: list[str] = [str(BUNDLED_REGISTRY)] if BUNDLED_REGISTRY.exists() else []
    files += [p for p in os.environ.get("GIGAPATH_REGISTRY", "").split(os.pathsep) if p]
    files += list(extra)
    presets: dict[str, Preset] = {}
    for f in files:
        presets.update(read_registry_file(f))
    return presets


def load_registry(extra_files: list[str | Path] = ()) -> dict[str, Preset]:
    """All presets: bundled, then ``GIGAPATH_REGISTRY``, then ``extra_files``."""
    return dict(_load(tuple(str(Path(f).resolve()) for f in extra_files)))


def presets_for(kind: str, extra_files: list[str | Path] = ()) -> dict[str, PresetComponent]:
    return {n: getattr(p, kind) for n, p in load_registry(extra_files).items() if getattr(p, kind) is not None}
