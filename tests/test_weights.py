"""Weight sources (gigapath_core.weights): local files, timm folders, the Hugging Face hub offline, key errors.

Models are small configs of the DINOv2 ViT architecture the presets use (2 blocks, 192-d). Nothing is
downloaded: the hub tests run with huggingface_hub in offline mode against a cache folder built here.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

import gigapath_core as gp
from gigapath_core.errors import WeightsError
from gigapath_core.weights import load_state_dict_strict, read_state_dict

SMALL = {"model_name": "vit_small_patch14_dinov2", "model_kwargs": {"embed_dim": 192, "depth": 2, "num_heads": 3}}


def small(weights="random", **kw):
    return gp.build("tile_encoder", "dinov2_vit", weights=weights, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def reference():
    """A small timm DINOv2 ViT with seeded weights and its timm-layout state dict (no ``model.`` prefix)."""
    torch.manual_seed(0)
    enc = small()
    return enc, {k: v.clone() for k, v in enc.model.state_dict().items()}


def assert_same_weights(enc, sd):
    own = enc.model.state_dict()
    assert set(own) == set(sd)
    for k in sd:
        assert torch.equal(own[k], sd[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pth"])
def test_local_files(reference, tmp_path, suffix):
    _, sd = reference
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    enc = small(weights=str(path))
    assert enc.weights_source == str(path)
    assert_same_weights(enc, sd)


def test_wrapped_training_checkpoints(reference, tmp_path):
    """{"model": sd} (TransPath, Prov-GigaPath slide encoder) and DINO's {"teacher", "student", "args"}."""
    _, sd = reference
    torch.save({"model": sd, "epoch": 3}, tmp_path / "a.pth")
    assert set(read_state_dict(tmp_path / "a.pth")) == set(sd)
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    torch.save({"student": other, "teacher": sd, "args": argparse.Namespace(arch="vit_small", lr=5e-4)},
               tmp_path / "dino.pth")
    loaded = read_state_dict(tmp_path / "dino.pth")  # argparse.Namespace is the one class allowed
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)  # the teacher, not the student


class Arbitrary:  # any class outside the allow-list must be refused, not unpickled
    pass


def test_refuses_pickled_objects(reference, tmp_path):
    _, sd = reference
    torch.save({"model": sd, "extra": Arbitrary()}, tmp_path / "evil.bin")
    with pytest.raises(WeightsError, match=r"evil\.bin.*(refused|Unsupported)") as err:
        small(weights=str(tmp_path / "evil.bin"))
    assert "\x1b" not in str(err.value)  # torch's message carries terminal colour codes; ours does not


def test_missing_and_unexpected_keys_named(reference, tmp_path):
    _, sd = reference
    bad = dict(sd)
    del bad["blocks.1.mlp.fc2.bias"]
    bad["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        small(weights=str(tmp_path / "bad.pth"))
    msg = str(err.value)
    assert "missing 1: blocks.1.mlp.fc2.bias" in msg and "unexpected 1: blocks.7.attn.qkv.weight" in msg
    assert "bad.pth" in msg and "\n" not in msg


def test_shape_mismatch_named(reference):
    enc, sd = reference
    bad = dict(sd)
    bad["norm.weight"] = torch.ones(7)
    with pytest.raises(WeightsError, match=r"shape mismatch 1: norm\.weight: checkpoint \(7,\) vs model \(192,\)"):
        load_state_dict_strict(enc.model, bad, "test")


def test_other_patch_size_refused(reference, tmp_path):
    _, sd = reference
    bad = dict(sd)
    bad["patch_embed.proj.weight"] = torch.zeros(192, 3, 16, 16)
    torch.save(bad, tmp_path / "p16.pth")
    with pytest.raises(WeightsError, match=r"patch size \(16, 16\).*\(14, 14\)"):
        small(weights=str(tmp_path / "p16.pth"))


def test_pos_embed_resampled_for_another_img_size(tmp_path, caplog):
    """A checkpoint trained at 518 px (DINOv2 hub weights) loads into a 224-px model: timm's resampling."""
    torch.manual_seed(1)
    big = small(img_size=518)
    torch.save(big.model.state_dict(), tmp_path / "w518.pth")
    with caplog.at_level(logging.INFO, logger="gigapath"):
        enc = small(weights=str(tmp_path / "w518.pth"))
    assert enc.model.pos_embed.shape == (1, 1 + 16 * 16, 192)  # 224 / 14 = 16 patches a side
    assert "pos_embed resampled from (1, 1370, 192) to (1, 257, 192)" in caplog.text  # 1 + 37 * 37 = 1370


def _timm_folder(model, folder: Path) -> Path:
    """Save like `timm` does for the hub: config.json (architecture, model_args...) + model.safetensors."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def test_timm_folder_with_config(reference, tmp_path):
    enc, sd = reference
    folder = _timm_folder(enc.model, tmp_path / "vit")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch14_dinov2" and cfg["model_args"]["depth"] == 2
    loaded = small(weights=str(folder))
    assert loaded.weights_source == str(folder)
    assert_same_weights(loaded, sd)


def test_timm_folder_of_another_architecture(tmp_path):
    deeper = small(model_kwargs={"embed_dim": 192, "depth": 3, "num_heads": 3})
    folder = _timm_folder(deeper.model, tmp_path / "deeper")
    with pytest.raises(WeightsError, match=r"depth: weights 3 vs model 2.*model_kwargs"):
        small(weights=str(folder))


def test_transformers_folder_refused(reference, tmp_path):
    _, sd = reference
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "architectures": ["Dinov2Model"]}))
    from safetensors.torch import save_file

    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="transformers model \\(dinov2\\)"):
        small(weights=str(folder))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="holds none of .*config.json but no weights"):
        small(weights=str(tmp_path))


def test_unset_variable_skipped_then_next_source(reference, tmp_path, monkeypatch):
    _, sd = reference
    torch.save(sd, tmp_path / "w.pth")
    monkeypatch.delenv("GIGAPATH_TEST_UNSET", raising=False)
    enc = small(weights=["${GIGAPATH_TEST_UNSET}/w.pth", str(tmp_path / "w.pth")])
    assert enc.weights_source == str(tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=r"no weights source worked.*GIGAPATH_TEST_UNSET is not set"):
        small(weights=["${GIGAPATH_TEST_UNSET}/w.pth"])


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """huggingface_hub in offline mode with an empty cache in tmp_path (no network is ever tried)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_offline_not_cached_says_how_to_get_it(offline_hub):
    with pytest.raises(WeightsError) as err:
        small(weights="hf_hub:prov-gigapath/prov-gigapath/pytorch_model.bin")
    msg = str(err.value)
    assert "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download prov-gigapath/prov-gigapath pytorch_model.bin" in msg and "HF_TOKEN" in msg
    assert "weights: /path/to/pytorch_model.bin" in msg and "\n" not in msg


def test_hub_offline_cache_hit(reference, offline_hub):
    """The cache layout huggingface_hub documents: models--ORG--NAME/{refs/main, snapshots/<commit>/<file>}."""
    from safetensors.torch import save_file

    _, sd = reference
    repo = offline_hub / "models--someorg--tiny-vit"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(sd, str(snap / "model.safetensors"))
    enc = small(weights="hf_hub:someorg/tiny-vit")
    assert enc.weights_source == "hf_hub:someorg/tiny-vit"
    assert_same_weights(enc, sd)


def test_random_is_explicit_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="gigapath"):
        enc = small(weights="random")
    assert enc.weights_source == "random"
    assert "DinoV2ViT: weights: random (not pretrained)" in caplog.text


def test_unreachable_hub_fails_in_seconds_listing_every_source(monkeypatch, tmp_path):
    """No network and no cache: the preset's sources are each named, $GIGAPATH_WEIGHTS first, within seconds
    (huggingface_hub alone retries for minutes; issue #12 item 3)."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens on loopback
    monkeypatch.delenv("GIGAPATH_WEIGHTS", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        gp.build("tile_encoder", "dinov2-vits14", model_kwargs={"depth": 1})
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert msg.startswith("no weights source worked for DinoV2ViT (tried 2, in order): 1. ${GIGAPATH_WEIGHTS}/"
                          "dinov2-vits14/model.safetensors: $GIGAPATH_WEIGHTS is not set")
    assert "| 2. hf_hub:timm/vit_small_patch14_dinov2.lvd142m: " in msg
    assert "127.0.0.1:9 cannot be reached" in msg and "weights: random" in msg
