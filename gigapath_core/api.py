"""Public Python API: :func:`build` and :func:`list_plugins`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import ConfigError, PluginNotFoundError
from .plugins import PluginInfo, check_kind, get_plugin_manager
from .presets import PresetComponent, load_registry, presets_for

#: ``weights_source`` of a model without parameters
NO_WEIGHTS = "none (no parameters)"


def resolve(kind: str, name: str, registry: list[str | Path] = ()) -> tuple[PluginInfo, PresetComponent | None]:
    """Plugin (and preset card, if ``name`` is a preset) for ``name`` of ``kind``.

    Raises PluginNotFoundError listing every plugin and preset name of that kind.
    """
    check_kind(kind)
    pm = get_plugin_manager()
    presets = presets_for(kind, registry)
    if name in presets:
        card = presets[name]
        return pm.get(kind, card.plugin), card
    if name in pm.plugins[kind]:
        return pm.plugins[kind][name], None
    from .suggest import did_you_mean

    choices = sorted(set(pm.names(kind)) | set(presets))
    raise PluginNotFoundError(kind, f"unknown plugin or preset {name!r}; valid choices: {', '.join(choices) or '(none)'}"
                                    f"{did_you_mean(name, choices)}")


def validate_params(kind: str, name: str, overrides: dict[str, Any] | None = None, registry=(), key_path: str = ""):
    """Validate ``overrides`` merged onto the preset's params; return (PluginInfo, Params, preset card).

    Raises ConfigError with the key path (``<key_path>.params.<field>``) of the first bad value.
    """
    info, card = resolve(kind, name, registry)
    params = {**(card.params if card else {}), **(overrides or {})}
    try:
        validated = info.cls.Params(**params)
    except ValidationError as err:
        from .errors import ConfigErrors, pydantic_message
        from .suggest import did_you_mean

        prefix = f"{key_path or kind}.params"
        fields = list(info.cls.Params.model_fields)
        found = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = pydantic_message(e)
            if e["type"] == "extra_forbidden":
                msg = f"unknown parameter for {kind} {info.name!r}; valid: {', '.join(fields)}"
                msg += did_you_mean(str(e["loc"][-1]), fields) if e["loc"] else ""
            found.append(ConfigError(f"{prefix}.{loc}" if loc else prefix, msg))
        raise ConfigErrors.of(found) from None
    return info, validated, card


def build(kind: str, name: str, *, weights: str | list[str] | None = None, registry=(), **overrides: Any):
    """Build a plugin object by plugin name or preset name.

    Args:
        kind: one of :data:`gigapath_core.hookspecs.KINDS` (``"tile_encoder"``, ``"slide_encoder"``...).
        name: a plugin name (``"dinov2_vit"``) or a preset name from the registry (``"prov-gigapath"``).
        weights: for models, a source or list of sources (see :mod:`gigapath_core.weights`); ``None``
            uses the preset's sources, or random initialisation for a bare plugin; ``"random"`` forces it.
        registry: extra registry files.
        **overrides: parameters, validated against the plugin's ``Params`` model.
    Returns:
        The plugin instance; models (nn.Module) are in eval mode with ``weights_source`` set.
    Raises:
        PluginNotFoundError: unknown kind or name (lists the choices).
        ConfigError: invalid parameter (key path + reason).
        WeightsError: weights could not be found or do not match.
    """
    info, params, card = validate_params(kind, name, overrides, registry)
    obj = info.cls.from_params(params)
    declared, made = getattr(card, "embed_dim", None), getattr(obj, "embed_dim", None)
    if declared and made is not None and int(declared) != int(made) and not overrides:
        # a card's embed_dim is what `gigapath presets` and the docs show: it must be what the model produces
        raise ConfigError(f"{kind}.name", f"preset {name!r} declares embed_dim {declared} but its {kind} "
                                          f"({info.name}) produces {made}-d embeddings; fix the registry entry")
    if hasattr(obj, "load_weights") and hasattr(obj, "state_dict"):
        from .weights import load_weights

        sources = [weights] if isinstance(weights, str) else list(weights or [])
        if weights is None:
            sources = list(card.weights) if card else []
        if next(iter(obj.parameters()), None) is None and all(s == "random" for s in sources):
            obj.weights_source = NO_WEIGHTS  # e.g. mean pooling: nothing to load, nothing to warn about
        else:
            obj.weights_source = load_weights(obj, sources)
        obj.eval()
    return obj


def list_plugins(kind: str | None = None) -> list[dict[str, str]]:
    """Every installed plugin as ``{kind, name, class, package, description}``, in data-flow order."""
    pm = get_plugin_manager()
    kinds = [kind] if kind else list(pm.plugins)
    return [pm.plugins[k][n].as_dict() for k in kinds for n in pm.names(k)]


def list_presets(registry=()) -> list[dict[str, Any]]:
    """Every preset as a model card: name, kinds, plugins, embed dims, weights, licence, gating, citation, source."""
    rows = []
    for name, p in load_registry(registry).items():
        rows.append(
            {
                "name": name,
                "description": p.description,
                "licence": p.licence,
                "citation": p.citation,
                "source": p.source,
                "gated": p.gated,
                "source_file": p.source_file,
                "components": {k: getattr(p, k).model_dump() for k in p.kinds()},
            }
        )
    return rows


def validate_stage(kind: str, name: str, params: dict, registry=(), key_path: str = "") -> None:
    """Raise ConfigError if ``name``/``params`` is not valid for ``kind``; used by config validation."""
    try:
        validate_params(kind, name, params, registry, key_path)
    except PluginNotFoundError as err:
        raise PluginNotFoundError(f"{key_path}.name", str(err).split(": ", 1)[1]) from None
