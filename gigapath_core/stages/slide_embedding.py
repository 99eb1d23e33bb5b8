"""Slide-embedding stage: ``tile_embeddings.h5`` -> slide encoder -> ``slide_embedding.h5``.

``slide_embedding.h5`` holds ``embedding``: (D,) float32, or (L, D) when the encoder returns one embedding per
layer (LongNet with ``all_layer_embed``: the input and each of the 12 layers, L = 13). Its attributes record
the encoder, its weights, the number of tiles and the tile encoder that made the inputs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, NonFiniteError, SlideError
from ..kinds import SlideEncoder
from ..store import read_h5, write_h5
from .tile_embedding import autocast_context, resolved_precision

log = logging.getLogger("gigapath")

SLIDE_FILE = "slide_embedding.h5"


@torch.inference_mode()
def encode_slide(encoder: SlideEncoder, features: np.ndarray, coords: np.ndarray, *,
                 device: torch.device = torch.device("cpu"), precision: str = "auto") -> np.ndarray:
    """One slide: features (N, Din) float32 + coords (N, 2) grid px at 0.5 µm/px -> slide embedding.

    Tiles are passed in the order given (the tiler's row-major order; the LongNet output depends on it).

    Returns:
        (D,) float32, or (L, D) float32 for encoders that return one embedding per layer.
    Raises:
        ConfigError: Din does not match the encoder's ``in_dim``, or (key ``coords``) a coordinate the encoder
            cannot place (e.g. outside LongNet's 1000 x 1000 position grid).
    """
    features = np.asarray(features)
    coords = np.asarray(coords)
    if features.ndim != 2 or features.shape[1] != encoder.in_dim:
        raise ConfigError(
            "slide_encoder.params",
            f"tile embeddings are {features.shape[-1] if features.ndim else '?'}-d but the slide encoder takes "
            f"{encoder.in_dim}-d (set its in_chans/in_dim to match the tile encoder)",
        )
    if coords.shape != (features.shape[0], 2):
        raise ConfigError("coords", f"expected ({features.shape[0]}, 2) tile coordinates, got {coords.shape}")
    encoder.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(device)
    c = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float64))[None].to(device)
    with autocast_context(device, precision):
        out = encoder(x, c)
    out = out[:, 0] if out.dim() == 3 else out[0]  # (L, B, D) per-layer output or (B, D)
    return out.float().cpu().numpy()


def run_slide_embedding(encoder: SlideEncoder, slide_dir: Path, tile_file: str, attrs: dict, *,
                        device: torch.device, precision: str) -> np.ndarray | None:
    """Write ``slide_embedding.h5`` from ``slide_dir / tile_file``; a slide with zero tiles gets no embedding
    (returns None).

    Raises:
        NonFiniteError: the input tile embeddings or the slide embedding are not finite (names the stage, the
            count and the likely cause; nothing is written).
        SlideError: the tile coordinates do not fit the encoder (named in the message); the pipeline records
            it for this slide and goes on.
        ConfigError: the encoder does not take tile embeddings of this width (affects every slide).
    """
    path = Path(slide_dir) / tile_file
    data, tile_attrs = read_h5(path)
    features, coords = data["features"], data["coords"]
    n = len(features)
    if n == 0:
        return None
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():  # the tile-embedding stage never writes these: an old gigapath or another tool did
        i = int(np.argmin(finite))
        raise NonFiniteError(path, f"slide-embedding stage: the input tile embeddings are non-finite (NaN/Inf) "
                                   f"for {int((~finite).sum())} of {n} tiles, first tile {i} (grid px "
                                   f"{tuple(int(v) for v in coords[i])}), written by tile encoder "
                                   f"{tile_attrs.get('tile_encoder', '?')!r} (weights "
                                   f"{tile_attrs.get('weights_source', '?')}); delete {tile_file} to recompute it")
    t0 = time.perf_counter()
    try:
        emb = encode_slide(encoder, features, coords, device=device, precision=precision)
    except ConfigError as err:
        if err.key_path != "coords":
            raise
        raise SlideError(path, str(err)) from None
    log.debug("slide encoder: %d tiles in %.2f s", n, time.perf_counter() - t0)
    if not np.isfinite(emb).all():
        used = resolved_precision(torch.device(device), precision)
        cause = "check the weights (a NaN/Inf parameter or a checkpoint for another architecture)"
        if used != "fp32":
            cause += f", or the {used} autocast overflowed: try slide_encoder.precision: fp32"
        raise NonFiniteError(path, f"slide-embedding stage: slide encoder {attrs.get('slide_encoder', type(encoder).name)!r} "
                                   f"(weights {getattr(encoder, 'weights_source', '?')}) produced a non-finite "
                                   f"slide embedding ({int((~np.isfinite(emb)).sum())} of {emb.size} values NaN/Inf) "
                                   f"from {n} finite tile embeddings; {cause}")
    write_h5(Path(slide_dir) / SLIDE_FILE, {"embedding": emb.astype(np.float32)},
             {**attrs, "n_tiles": int(n), "coords_unit": "grid px at 0.5 um/px",
              "embedding_layout": "per_layer" if emb.ndim == 2 else "slide",
              "tile_encoder": tile_attrs.get("tile_encoder", ""),
              "tile_encoder_weights": tile_attrs.get("weights_source", "")})
    return emb
