"""Slide encoders take their input width from the tile encoder or the features (issue #12 item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gigapath_core.config import load_pipeline_config
from gigapath_core.errors import ConfigError
from gigapath_core.widths import fill_input_width, tile_encoder_width, width_param


def _raw(slide: Path, slide_encoder: dict) -> dict:
    return {"inputs": {"slides": [str(slide)]}, "readers": ["openslide"],
            "tile_encoder": {"name": "dinov2-vits14", "weights": "random"}, "slide_encoder": slide_encoder}


def test_each_plugin_names_its_own_width_key():
    assert width_param("longnet") == "in_chans"
    assert width_param("prov-gigapath") == "in_chans"  # a preset of the longnet plugin
    assert width_param("mean") == width_param("abmil_only") == width_param("hipt_region") == "in_dim"


def test_tile_encoder_width_from_card_and_from_meta_build():
    assert tile_encoder_width("dinov2-vits14", {}) == 384  # the card's embed_dim
    assert tile_encoder_width("dinov2_vit", {"model_name": "vit_small_patch14_dinov2"}) == 384  # built on meta
    assert tile_encoder_width("dinov2_vit", {"model_name": "vit_small_patch14_dinov2", "embedding": "cls_mean"}) == 768


@pytest.mark.parametrize("encoder, key", [({"name": "mean"}, "in_dim"), ({"name": "abmil_only"}, "in_dim"),
                                          ({"name": "prov-gigapath", "weights": "random"}, "in_chans")])
def test_embed_config_fills_the_width(example_slide, tmp_path, encoder, key):
    cfg, _ = load_pipeline_config(_raw(example_slide, encoder), tmp_path, str(tmp_path / "out"))
    assert cfg.slide_encoder.params == {key: 384}


def test_a_given_width_that_disagrees_is_an_error(example_slide, tmp_path):
    raw = _raw(example_slide, {"name": "mean", "params": {"in_dim": 512}})
    with pytest.raises(ConfigError, match=r"^slide_encoder\.params\.in_dim: 512 does not match the 384-d "
                                          r"embeddings of the tile encoder 'dinov2-vits14'; leave it out"):
        load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))
    raw["slide_encoder"]["params"]["in_dim"] = 384  # agreeing: kept
    assert load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))[0].slide_encoder.params == {"in_dim": 384}


def test_preset_weights_for_another_width_are_refused():
    # prov-gigapath's released slide encoder takes 1536-d tiles: filling 384 would fail at weight loading
    with pytest.raises(ConfigError, match=r"^slide_encoder\.name: preset 'prov-gigapath' takes 1536-d tile "
                                          r"embeddings .* gives 384-d"):
        fill_input_width("prov-gigapath", {}, 384)
    assert fill_input_width("prov-gigapath", {}, 384, weights="random") == {"in_chans": 384}
    assert fill_input_width("prov-gigapath", {}, 1536) == {"in_chans": 1536}
    assert fill_input_width("mean", {"x": 1}, None) == {"x": 1}  # unknown width: unchanged


def test_features_input_fills_the_width(tmp_path):
    import h5py
    import numpy as np

    folder = tmp_path / "feats"
    folder.mkdir()
    with h5py.File(folder / "s1.h5", "w") as f:  # a prov-gigapath-style file: features + grid px coords
        f["features"] = np.zeros((3, 40), np.float32)
        f["coords"] = np.array([[0, 0], [256, 0], [0, 256]], np.int64)
    raw = {"inputs": {"features": str(folder), "coords_unit": "grid_px", "mpp": 0.5},
           "slide_encoder": {"name": "mean"}}
    cfg, slides = load_pipeline_config(raw, tmp_path, str(tmp_path / "out"))
    assert [s.slide_id for s in slides] == ["s1"]
    assert cfg.slide_encoder.params == {"in_dim": 40}
