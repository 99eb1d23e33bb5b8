"""The fine-tuned model built from a finetune config and its data: slide encoder + task head with every width
and the output count filled in, and the one forward pass that checks they fit together (Xu et al. 2024, Methods:
mutation prediction, cancer subtyping).

Used by the runner (each fold's model), by the pre-flight (:mod:`.preflight`: the same model with random
weights, before anything is written) and by ``gigapath heatmap`` (the fold models rebuilt from checkpoints).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .config import FinetuneConfig
from .data import FinetuneData, SlideRecord, load_slide
from .encoder_cache import slide_key
from .model import SlideClassifier

CHECK_TILES = 64  # tiles of the one slide the check forward pass reads


def build_model(cfg: FinetuneConfig, data: FinetuneData, random_weights: bool = False) -> SlideClassifier:
    """Slide encoder (weights per config) + task head, with widths and output count filled in.

    ``data`` needs only ``tile_dim`` and ``task``. ``random_weights``: build the slide encoder without reading
    any weights (the architecture and every width check are the same; for the pre-flight check).
    Raises ConfigError if a width set in the config disagrees with the data or the task.
    """
    from ..api import build, resolve
    from ..widths import fill_input_width

    se_cfg, head_cfg = cfg.model.slide_encoder, cfg.model.head
    encoder = None
    if se_cfg is not None:
        params = fill_input_width(se_cfg.name, se_cfg.params, data.tile_dim, registry=cfg.registry,
                                  weights=se_cfg.weights, key_path="model.slide_encoder",
                                  source="the tile embeddings")
        encoder = build("slide_encoder", se_cfg.name, weights="random" if random_weights else se_cfg.weights,
                        registry=cfg.registry, **params)
        if encoder.in_dim != data.tile_dim:
            raise ConfigError("model.slide_encoder.params", f"the tile embeddings are {data.tile_dim}-d but the slide "
                              f"encoder {se_cfg.name!r} takes {encoder.in_dim}-d")
    width = encoder.embed_dim if encoder is not None else data.tile_dim
    info, card = resolve("task_head", head_cfg.name, cfg.registry)
    fields = info.cls.Params.model_fields
    params = {**(card.params if card else {}), **head_cfg.params}
    auto = {"in_dim": width, "num_classes": data.task.num_outputs}
    for key, value in auto.items():
        if key not in fields:
            continue
        if key in params and params[key] != value:
            what = "the task's number of outputs" if key == "num_classes" else "the width of the head's input"
            raise ConfigError(f"model.head.params.{key}", f"{params[key]} does not match {what} ({value}); "
                              "leave it out to fill it in automatically")
        params[key] = value
    if params.get("shortcut") and "shortcut_dim" in fields and params.get("shortcut_dim") is None:
        params["shortcut_dim"] = data.tile_dim
    head = build("task_head", head_cfg.name, registry=cfg.registry, **params)
    return SlideClassifier(encoder, head, freeze_encoder=bool(se_cfg and se_cfg.freeze),
                           standardize_dim=data.tile_dim if cfg.model.standardize_features else None)


def whole_slide_key(record: SlideRecord, max_tiles: int | None) -> str | None:
    """The encoder-cache key of ``record`` if a load with ``max_tiles`` gives the whole slide, else None."""
    if max_tiles is not None and record.n_tiles > max_tiles:
        return None
    return slide_key(record.path, record.read_options)


def check_forward(model: SlideClassifier, data: FinetuneData, slide_id: str) -> None:
    """One forward pass (CPU or the model's device, no gradients) on at most 64 tiles of ``slide_id``, so a
    head/encoder mismatch is a config error, not a crash mid-run.

    Raises ConfigError (``model``: the model cannot run; ``model.head``: logits of the wrong shape).
    """
    rec = data.slides[slide_id]
    feats, coords = load_slide(rec, max_tiles=CHECK_TILES, rng=np.random.default_rng(0))
    try:
        with torch.no_grad():
            logits = model.eval()(feats, coords, cache_key=whole_slide_key(rec, CHECK_TILES))
    except (ValueError, RuntimeError) as err:
        raise ConfigError("model", f"the model cannot run on {slide_id}: {str(err).splitlines()[0]}") from None
    if tuple(logits.shape) != (1, data.task.num_outputs):
        raise ConfigError("model.head", f"the head gives logits of shape {tuple(logits.shape)}, the task needs "
                          f"(1, {data.task.num_outputs})")
