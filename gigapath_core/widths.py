"""The input width Din of slide encoders, filled from what feeds them (issue #12 item 1).

Every slide encoder names the ``Params`` field that sets its input width in the class attribute
:attr:`gigapath_core.kinds.SlideEncoder.input_width_param` (``in_dim`` for most; ``in_chans`` for LongNet, the
name in Prov-GigaPath's ``slide_encoder.pth`` constructor). Wherever the width of the tile embeddings is known
(the tile encoder of an ``embed`` config, a features file, the embeddings of a finetune or pretraining job),
:func:`fill_input_width` sets that field, so swapping the slide encoder is one line (``--set
slide_encoder.name=mean``). Rules:

* a width the user gives in ``params`` must equal the known width (else ConfigError at that key);
* a preset card's value is only a default for the card's own tile encoder and is replaced, except when the
  card's pretrained weights are loaded (they are for the card's width): then a mismatch is a ConfigError.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def width_param(name: str, registry=()) -> str | None:
    """The ``Params`` field that sets the input width of slide encoder ``name`` (plugin or preset), or None
    if the plugin has none. Raises PluginNotFoundError for an unknown name."""
    from .api import resolve

    info, _ = resolve("slide_encoder", name, registry)
    key = getattr(info.cls, "input_width_param", None)
    return key if key and key in info.cls.Params.model_fields else None


def fill_input_width(name: str, params: dict[str, Any] | None, width: int | None, *, registry=(),
                     weights: str | list[str] | None = None, key_path: str = "slide_encoder",
                     source: str = "the tile encoder") -> dict[str, Any]:
    """``params`` (the user's overrides for slide encoder ``name``) with its input width set to ``width``.

    Args:
        width: Din of the tile embeddings, or None when unknown (``params`` returned unchanged).
        weights: the stage's ``weights:`` setting (None = the preset's own weights).
        key_path: config key of the stage, for errors (``model.slide_encoder``).
        source: what gives ``width``, for errors (``the tile encoder``, ``the features in DIR``).
    Returns:
        A new dict; unchanged when ``width`` is None or the plugin has no input-width field.
    Raises:
        ConfigError: a user-given width that disagrees with ``width`` (``<key_path>.params.<field>``), or a
            preset whose pretrained weights are for another width.
    """
    from .api import resolve

    params = dict(params or {})
    if width is None:
        return params
    key = width_param(name, registry)
    if key is None:
        return params
    width = int(width)
    if key in params:
        if params[key] != width:
            raise ConfigError(f"{key_path}.params.{key}", f"{params[key]} does not match the {width}-d embeddings of "
                              f"{source}; leave it out to fill it in automatically")
        return params
    _, card = resolve("slide_encoder", name, registry)
    card_width = card.params.get(key) if card else None
    loads_card_weights = weights is None and card is not None and any(w != "random" for w in card.weights)
    if card_width is not None and card_width != width and loads_card_weights:
        raise ConfigError(f"{key_path}.name", f"preset {name!r} takes {card_width}-d tile embeddings (its "
                          f"pretrained weights are for that width) but {source} gives {width}-d; use a "
                          f"{card_width}-d tile encoder, or weights: random to train it from scratch")
    params[key] = width
    return params


def tile_encoder_width(name: str, params: dict[str, Any] | None, registry=()) -> int | None:
    """Embedding width of tile encoder ``name`` with ``params``, without loading weights or allocating memory:
    the preset card's ``embed_dim`` when no params are overridden (checked at build, :func:`~.api.build`),
    else the plugin built on PyTorch's ``meta`` device. None if it cannot be told (a plugin that cannot be
    built on ``meta``); the embed pipeline then fills the width after building the model."""
    import torch

    from .api import validate_params

    info, validated, card = validate_params("tile_encoder", name, params, registry)
    if card is not None and card.embed_dim and not params:
        return int(card.embed_dim)
    try:
        with torch.device("meta"):
            obj = info.cls.from_params(validated)
    except Exception:  # pragma: no cover - a plugin that needs real tensors to build
        return None
    dim = getattr(obj, "embed_dim", None)
    return int(dim) if dim is not None else None
