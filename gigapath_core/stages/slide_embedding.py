"""Slide-embedding stage: ``tile_embeddings.h5`` -> slide encoder -> ``slide_embedding.h5``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..kinds import SlideEncoder
from ..store import read_h5, write_h5
from .tile_embedding import autocast_context

SLIDE_FILE = "slide_embedding.h5"


@torch.inference_mode()
def encode_slide(encoder: SlideEncoder, features: np.ndarray, coords: np.ndarray, *,
                 device: torch.device = torch.device("cpu"), precision: str = "auto") -> np.ndarray:
    """One slide: features (N, Din) float32 + coords (N, 2) grid px -> (D,) float32 slide embedding.

    Raises ConfigError if Din does not match the encoder's ``in_dim``.
    """
    if features.shape[1] != encoder.in_dim:
        raise ConfigError(
            "slide_encoder.params",
            f"tile embeddings are {features.shape[1]}-d but the slide encoder takes {encoder.in_dim}-d "
            f"(set its in_chans/in_dim to match the tile encoder)",
        )
    encoder.to(device).eval()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None].to(device)
    c = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32))[None].to(device)
    with autocast_context(device, precision):
        out = encoder(x, c)
    return out[0].float().cpu().numpy()


def run_slide_embedding(encoder: SlideEncoder, slide_dir: Path, tile_file: str, attrs: dict, *,
                        device: torch.device, precision: str) -> np.ndarray | None:
    """Write ``slide_embedding.h5``; a slide with zero tiles gets no embedding (returns None)."""
    data, tile_attrs = read_h5(slide_dir / tile_file)
    if len(data["features"]) == 0:
        return None
    emb = encode_slide(encoder, data["features"], data["coords"], device=device, precision=precision)
    write_h5(slide_dir / SLIDE_FILE, {"embedding": emb.astype(np.float32)},
             {**attrs, "n_tiles": int(len(data["features"])), "coords_unit": "grid px at 0.5 um/px",
              "tile_encoder": tile_attrs.get("tile_encoder", ""),
              "tile_encoder_weights": tile_attrs.get("weights_source", "")})
    return emb
