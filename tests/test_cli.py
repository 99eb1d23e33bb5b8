"""CLI: presets, doctor, user registry files, weights sources."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gigapath_core as gp
from gigapath_core.errors import ConfigError, WeightsError


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "gigapath_core.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_presets_json_are_model_cards():
    rows = {r["name"]: r for r in json.loads(_cli("presets", "--json").stdout)}
    card = rows["prov-gigapath"]
    assert card["components"]["tile_encoder"]["embed_dim"] == 1536  # Xu et al. 2024, Methods: tile encoder
    assert "Nature" in card["citation"] and card["licence"]
    assert rows["dinov2-vits14"]["components"]["tile_encoder"]["embed_dim"] == 384


def test_presets_explains_its_markers(capsys):
    """Every marker in the licence column ([TR], [L], 🔒) is explained on one legend line under the table, on
    stderr, so the table on stdout stays tab-separated."""
    from gigapath_core.cli import main
    from gigapath_core.zoo import MARKERS

    assert main(["presets"]) == 0
    cap = capsys.readouterr()
    table = cap.out.splitlines()
    assert table[0] == "name\tcomponents\tlicence" and all(line.count("\t") == 2 for line in table)
    used = [m for m in MARKERS if m in cap.out]
    assert used == ["[TR]", "[L]", "🔒"]
    assert cap.err.splitlines() == [
        "markers: [TR] = TRIDENT README (patch-encoder table), [L] = LazySlide `model_registry.json`, 🔒 = gated "
        "(access on request) per the TRIDENT README; every card's sources: gigapath presets --markdown (docs/zoo.md)"]


def test_user_registry_file_adds_a_preset(tmp_path):
    reg = tmp_path / "my_registry.yaml"
    reg.write_text("presets:\n  tiny-vit:\n    licence: MIT\n    tile_encoder:\n      plugin: dinov2_vit\n"
                   "      params: {model_kwargs: {depth: 1, embed_dim: 192, num_heads: 3}}\n      embed_dim: 192\n")
    proc = _cli("presets", "--json", env={"GIGAPATH_REGISTRY": str(reg)})
    assert "tiny-vit" in {r["name"] for r in json.loads(proc.stdout)}
    enc = gp.build("tile_encoder", "tiny-vit", registry=[reg])
    assert enc.embed_dim == 192 and enc.weights_source == "random"


def test_bad_registry_file_names_the_key(tmp_path):
    reg = tmp_path / "bad.yaml"
    reg.write_text("presets:\n  x:\n    tile_encoder: {plugin: dinov2_vit, weigths: []}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:presets\.x\.tile_encoder\.weigths: Extra inputs"):
        gp.build("tile_encoder", "x", registry=[reg])


def test_doctor_reports_readers_device_and_offline_weights(tmp_path):
    from safetensors.torch import save_file

    enc = gp.build("tile_encoder", "dinov2-vits14", weights="random")
    (tmp_path / "dinov2-vits14").mkdir()
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()},
              str(tmp_path / "dinov2-vits14" / "model.safetensors"))
    info = json.loads(_cli("doctor", "--json", env={"GIGAPATH_WEIGHTS": str(tmp_path)}).stdout)
    assert info["slide_readers"]["openslide"] == {"package": "gigapath-plugins", "status": "usable"}
    assert info["slide_readers"]["tiatoolbox"]["status"] == "usable"  # installed by the README's test command
    assert info["torch"]["cuda_available"] == torch.cuda.is_available()
    assert info["weights"]["dinov2-vits14/tile_encoder"].startswith("local (")
    prov = info["weights"]["prov-gigapath/tile_encoder"]
    assert prov.startswith("not available offline (runs with `weights: random`, as the quick start does)")
    # every source is named, in the loader's order: $GIGAPATH_WEIGHTS first, then the hub
    assert prov.index("${GIGAPATH_WEIGHTS}/prov-gigapath/pytorch_model.bin: weights file not found") < prov.index(
        "| hf_hub:prov-gigapath/prov-gigapath: pytorch_model.bin is not in the local Hugging Face cache")
    # and the preset now loads those weights from the local file by default
    os.environ["GIGAPATH_WEIGHTS"] = str(tmp_path)
    try:
        loaded = gp.build("tile_encoder", "dinov2-vits14")
    finally:
        del os.environ["GIGAPATH_WEIGHTS"]
    assert loaded.weights_source.endswith("dinov2-vits14/model.safetensors")
    torch.testing.assert_close(loaded.model.pos_embed, enc.model.pos_embed)


def test_doctor_says_an_unset_weights_folder_once(monkeypatch, capsys):
    """$GIGAPATH_WEIGHTS unset: one line under [environment] says so; each preset names only where it looked."""
    from gigapath_core.cli import main

    monkeypatch.delenv("GIGAPATH_WEIGHTS", raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.count("not set") == 1
    assert ("  GIGAPATH_WEIGHTS: not set: point it at a folder of downloaded weights (the ${GIGAPATH_WEIGHTS}/... "
            "paths under [weights]); until then those sources are skipped\n") in out
    assert out.index("[environment]") < out.index("GIGAPATH_WEIGHTS: not set") < out.index("[weights]")
    assert ("  ctranspath/tile_encoder: not available offline (runs with `weights: random`, as the quick start "
            "does): ${GIGAPATH_WEIGHTS}/ctranspath/ctranspath.pth\n") in out


def test_offline_hub_source_says_how_to_get_the_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"prov-gigapath/prov-gigapath.*HF_TOKEN.*weights: /path/to/pytorch_model\.bin"):
        gp.build("tile_encoder", "dinov2_vit", weights="hf_hub:prov-gigapath/prov-gigapath/pytorch_model.bin",
                 model_kwargs={"depth": 1})


def test_doctor_finds_a_cached_model_safetensors(tmp_path):
    """The hub cache layout huggingface_hub documents (models--ORG--NAME/refs/main, snapshots/<commit>/FILE): a
    cached model.safetensors counts as offline weights, as the loader prefers it (issue #12 item 2)."""
    repo = tmp_path / "models--timm--vit_small_patch14_dinov2.lvd142m"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "model.safetensors").write_bytes(b"x")
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env_clean = {k: v for k, v in os.environ.items() if k != "GIGAPATH_WEIGHTS"}
    proc = subprocess.run([sys.executable, "-m", "gigapath_core.cli", "doctor", "--json"], capture_output=True,
                          text=True, env={**env_clean, **env})
    info = json.loads(proc.stdout)
    assert info["weights"]["dinov2-vits14/tile_encoder"].startswith("cached (hf_hub:timm/vit_small_patch14_dinov2")
    assert info["weights"]["dinov2-vits14/tile_encoder"].endswith("model.safetensors)")


def test_doctor_says_a_reader_is_unusable_when_its_library_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiatoolbox", None)  # import tiatoolbox -> ImportError
    monkeypatch.setitem(sys.modules, "tiatoolbox.wsicore", None)
    monkeypatch.setitem(sys.modules, "tiatoolbox.wsicore.wsireader", None)
    from gigapath_core.doctor import _reader_status

    status = _reader_status(gp.build("slide_reader", "tiatoolbox"))
    assert status.startswith("not usable: tiatoolbox is not installed") and "pip install --no-deps tiatoolbox" in status
    assert _reader_status(gp.build("slide_reader", "openslide")) == "usable"


def test_card_embed_dim_is_checked_at_build(tmp_path):
    """A card's declared embed_dim is what `gigapath presets` shows; a card that lies fails at build (issue #12)."""
    reg = tmp_path / "lying.yaml"
    reg.write_text("presets:\n  liar:\n    licence: MIT\n    tile_encoder:\n      plugin: dinov2_vit\n"
                   "      params: {model_name: vit_small_patch14_dinov2, model_kwargs: {depth: 1}}\n"
                   "      embed_dim: 999\n")
    with pytest.raises(ConfigError, match=r"^tile_encoder\.name: preset 'liar' declares embed_dim 999 but its "
                                          r"tile_encoder \(dinov2_vit\) produces 384-d embeddings"):
        gp.build("tile_encoder", "liar", registry=[reg], weights="random")


def test_a_missing_report_folder_is_one_plain_line(tmp_path, capsys):
    """A path the user typed wrong gets no traceback hint (that is for internal errors, test_hostile_configs)."""
    from gigapath_core.cli import main

    assert main(["report", str(tmp_path / "nonexist")]) == 2
    assert capsys.readouterr().err == f"gigapath: error: OUT_DIR: no such folder: {tmp_path / 'nonexist'}\n"
    (tmp_path / "file").write_text("x")
    assert main(["report", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err == f"gigapath: error: OUT_DIR: not a folder: {tmp_path / 'file'}\n"
