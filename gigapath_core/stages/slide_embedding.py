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
from ..store import write_h5
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
            f"{encoder.in_dim}-d (leave its {getattr(encoder, 'input_width_param', None) or 'input width'} out "
            "of the config to fill it in from the tile embeddings)",
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


def run_slide_embedding(encoder: SlideEncoder, slide_dir: Path, tile_file: str | Path, attrs: dict, *,
                        device: torch.device, precision: str, read_options: dict | None = None) -> np.ndarray | None:
    """Write ``slide_embedding.h5`` from ``slide_dir / tile_file`` (ours, or any tool's feature file: an absolute
    ``tile_file`` is read where it is); a slide with zero tiles gets no embedding (returns None).

    Args:
        read_options: keyword arguments of :func:`gigapath_core.interop.read_tile_features` (``level0_mpp``,
            ``coords_unit``, ``tile_size``, ``key_prefix``) for foreign files.
    Raises:
        NonFiniteError: the input tile embeddings (from :func:`read_tile_features`) or the slide embedding are
            not finite (names the stage or file, the count and the likely cause; nothing is written).
        SlideError: the feature file is unreadable (:class:`FeatureFileError`), or its coordinates do not fit
            the encoder (named in the message); the pipeline records it for this slide and goes on.
        ConfigError: the encoder does not take tile embeddings of this width, or the file's units cannot be
            worked out (names the key that supplies them).
    """
    from ..interop import read_tile_features

    tf = read_tile_features(Path(slide_dir) / tile_file, **(read_options or {}))
    return embed_tile_features(encoder, tf, slide_dir, attrs, device=device, precision=precision)


def embed_tile_features(encoder: SlideEncoder, tf, slide_dir: Path, attrs: dict, *, device: torch.device,
                        precision: str) -> np.ndarray | None:
    """Slide-encode a :class:`gigapath_core.interop.TileFeatures` (its ``grid_coords``) and write
    ``slide_dir/slide_embedding.h5``; None (nothing written) for zero tiles. Raises as :func:`run_slide_embedding`."""
    path = tf.path
    n = len(tf.features)
    if n == 0:
        return None
    t0 = time.perf_counter()
    try:
        emb = encode_slide(encoder, tf.features, tf.grid_coords, device=device, precision=precision)
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
             {**attrs, "n_tiles": int(n), "grid_coords_unit": f"grid px at {tf.target_mpp} um/px",
              "embedding_layout": "per_layer" if emb.ndim == 2 else "slide",
              "tile_features": str(path), "tile_features_format": tf.source_format,
              "tile_encoder": str(tf.attrs.get("tile_encoder", tf.attrs.get("extractor", ""))),
              "tile_encoder_weights": str(tf.attrs.get("weights_source", ""))})
    return emb
