"""The tile-encoder zoo (issue #14): every preset's card against published figures, offline, with random weights.

For each preset: the card is complete (licence, gated, citation, source, mpp, embedding rule, dims, parameters);
the model built from the registry has the card's parameter count, and that count matches the published figure;
its output width is the published embedding dimension; its transform equals the torchvision pipeline the model's
card/loader publishes; and a state dict built from the *published* architecture (the model card's own
``timm.create_model`` call, written out here independently of the registry, with the classes the cards pass)
loads strictly. Every preset is built on the meta device for these checks (the 0.3-1.1 B-parameter ones would
need GBs and minutes otherwise); a real forward only for the ViT-S/16 one.

Published figures and where they were read (also in each card's ``source``):
  [L]  LazySlide src/lazyslide/models/model_registry.json: param_size (rounded to 0.1 M / 0.01 B)
  [H]  Hugging Face file listings: model.safetensors size of the float32 release = 4 bytes x parameters
  [1a] huggingface.co/1aurent/vit_giant_patch14_reg4_224.h-optimus-v0 card: "Params: 1.13B"
  [TR] TRIDENT README patch-encoder table: embedding dim; [T] TRIDENT patch_encoder_models/load.py: kwargs
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.layers import SwiGLUPacked
from torchvision import transforms as T

import gigapath_core as gp
from gigapath_core.errors import ConfigError
from gigapath_core.presets import load_registry

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # bioptimus/H-optimus-0 config.json
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # [T] KAIKO_MEAN/STD; 1aurent kaiko model cards
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))  # eva lunit.py docstring
BIL, BIC = T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC

VIRCHOW = dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True,
               mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)  # [T] VirchowInferenceEncoder / paige-ai card

# name: (timm name, published kwargs, (published figure, scale, digits, source), published dim, readout,
#        (resize, crop, interpolation, (mean, std)))
ZOO = {
    "uni": ("vit_large_patch16_224",
            dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
            (303.4, 1e-6, 1, "[L] 303.4M"), 1024, "cls", (224, 224, BIL, IMAGENET)),
    "uni2-h": ("vit_giant_patch14_224",
               dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                    mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked,
                    act_layer=torch.nn.SiLU, reg_tokens=8, dynamic_img_size=True),
               (681.4, 1e-6, 1, "[L] 681.4M"), 1536, "cls", (224, 224, BIL, IMAGENET)),
    "virchow": ("vit_huge_patch14_224", VIRCHOW, (631.2, 1e-6, 1, "[L] 631.2M"), 2560, "cls_mean",
                (224, 224, BIC, IMAGENET)),
    "virchow2": ("vit_huge_patch14_224", {**VIRCHOW, "reg_tokens": 4}, (631.2, 1e-6, 1, "[L] 631.2M"), 2560,
                 "cls_mean", (224, 224, BIC, IMAGENET)),
    "virchow2-cls": ("vit_huge_patch14_224", {**VIRCHOW, "reg_tokens": 4}, (631.2, 1e-6, 1, "[L] 631.2M"), 1280,
                     "cls", (224, 224, BIC, IMAGENET)),
    "h-optimus-0": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, init_values=1e-5),
                    (1.13, 1e-9, 2, "[1a] 1.13B; [H] 4.54 GB"), 1536, "cls", (224, 224, BIC, HOPTIMUS)),
    "h-optimus-1": ("vit_giant_patch14_reg4_dinov2", dict(num_classes=0, img_size=224, init_values=1e-5),
                    (1.13, 1e-9, 2, "[L] 1.13B"), 1536, "cls", (224, 224, BIC, HOPTIMUS)),
    "gpfm": ("vit_large_patch14_dinov2", dict(img_size=224, init_values=1e-5, num_classes=0),
             (303, 1e-6, 0, "[L] 303M"), 1024, "cls", (224, 224, BIC, IMAGENET)),
    # Kaiko and Lunit: the float32 model.safetensors size shown by the hub = 4 bytes x parameters (+ a header)
    "kaiko-vits16": ("vit_small_patch16_224", dict(num_classes=0, img_size=224),
                     (86.7, 4e-6, 1, "[H] 86.7 MB"), 384, "cls", (224, 224, BIL, KAIKO)),
    "kaiko-vits8": ("vit_small_patch8_224", dict(num_classes=0, img_size=224),
                    (86.7, 4e-6, 1, "[H] 86.7 MB"), 384, "cls", (224, 224, BIL, KAIKO)),
    "kaiko-vitb16": ("vit_base_patch16_224", dict(num_classes=0, img_size=224),
                     (343, 4e-6, 0, "[H] 343 MB"), 768, "cls", (224, 224, BIL, KAIKO)),
    "kaiko-vitb8": ("vit_base_patch8_224", dict(num_classes=0, img_size=224),
                    (343, 4e-6, 0, "[H] 343 MB"), 768, "cls", (224, 224, BIL, KAIKO)),
    # [T] builds the L/14 at 518 px (IMG_SIZE = 518): 1.22 GB only fits the 37 x 37 grid (at 224 px it is 1.21 GB)
    "kaiko-vitl14": ("vit_large_patch14_reg4_dinov2", dict(num_classes=0, img_size=518),
                     (1.22, 4e-9, 2, "[H] 1.22 GB"), 1024, "cls", (224, 224, BIL, KAIKO)),
    # Lunit README: VisionTransformer(img_size=224, patch_size=p, embed_dim=384, num_heads=6, num_classes=0)
    "lunit-vits8": ("vit_small_patch8_224", dict(img_size=224, patch_size=8, embed_dim=384, num_heads=6, num_classes=0),
                    (86.7, 4e-6, 1, "[H] 86.7 MB"), 384, "cls", (224, 224, BIL, LUNIT)),
    "lunit-vits16": ("vit_small_patch16_224",
                     dict(img_size=224, patch_size=16, embed_dim=384, num_heads=6, num_classes=0),
                     (86.7, 4e-6, 1, "[H] 86.7 MB"), 384, "cls", (224, 224, BIL, LUNIT)),
}
SMALL = {"kaiko-vits16"}  # a real forward (22 M parameters, 196 patch tokens)


def test_zoo_size_and_cards_complete():
    """≥ 15 tile-encoder presets beyond the paper's baselines, each card with every field filled."""
    registry = load_registry()
    assert set(ZOO) <= set(registry) and len(ZOO) >= 15
    for name in ZOO:
        card = registry[name]
        te = card.tile_encoder
        assert card.licence and card.citation and card.source and card.gated is not None, name
        assert te.plugin == "dinov2_vit" and te.embed_dim and te.params_count and te.mpp == 0.5, name
        assert te.embedding_rule and any(w.startswith("hf_hub:") for w in te.weights), name


def _reference(name):
    arch, kwargs = ZOO[name][:2]
    return timm.create_model(arch, pretrained=False, **kwargs)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_preset_matches_published_architecture(name, real_tile):
    arch, kwargs, (figure, scale, digits, source), dim, readout, (resize, crop, interp, (mean, std)) = ZOO[name]
    card = load_registry()[name].tile_encoder
    with torch.device("meta"):  # parameters, shapes and names only: no memory, no initialisation time
        enc = gp.build("tile_encoder", name, weights="random")
        ref = _reference(name)
    # parameters: the card's exact count, which rounds to the published figure
    count = sum(p.numel() for p in enc.parameters())
    assert count == card.params_count == sum(p.numel() for p in ref.parameters())
    assert round(count * scale, digits) == figure, f"{name}: {count} vs {source}"
    # output width: the published embedding dimension
    assert enc.embed_dim == card.embed_dim == dim
    assert enc.embedding == readout
    # the released key layout (the published architecture's own state dict) loads strictly
    enc.load_weights(ref.state_dict(), "published layout")
    assert set(enc.vit.state_dict()) == set(ref.state_dict())
    # transform: the card's torchvision pipeline, on a 256-px tile and on a non-square one
    want = T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(crop), T.ToTensor(), T.Normalize(mean, std)])
    from PIL import Image

    for tile in (real_tile, real_tile[:200, :230]):
        got = enc.transform(tile)
        assert got.shape == (3, crop, crop) and torch.equal(got, want(Image.fromarray(tile)))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_presets_forward_like_the_published_model(name, real_tile):
    """Weights with distinct values in the published layout give the published model's output exactly."""
    torch.manual_seed(0)
    ref = _reference(name).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    enc = gp.build("tile_encoder", name, weights="random")
    enc.load_weights(ref.state_dict(), "published layout")
    x = enc.transform(real_tile)[None]
    with torch.inference_mode():
        got, want = enc(x), ref(x)
    assert got.shape == (1, 384) and torch.equal(got, want)


def test_cls_mean_readout_excludes_register_tokens():
    """Virchow's rule on a tiny ViT with 4 registers: CLS ⊕ mean(tokens[:, 5:]) (TRIDENT Virchow2 forward)."""
    kwargs = dict(embed_dim=32, depth=1, num_heads=2, patch_size=16, reg_tokens=4, mlp_layer="SwiGLUPacked",
                  act_layer="silu", mlp_ratio=2.0)
    enc = gp.build("tile_encoder", "dinov2_vit", weights="random", model_name="vit_small_patch16_224",
                   model_kwargs=kwargs, img_size=64, resize=64, embedding="cls_mean")
    mlp = enc.vit.blocks[0].mlp  # SwiGLUPacked = GluMlp(gate_last=False) with SiLU: fc1 packs value and gate
    assert enc.embed_dim == 64 and type(mlp).__name__ == "GluMlp" and isinstance(mlp.act, torch.nn.SiLU)
    assert mlp.fc1.out_features == 2 * mlp.fc2.in_features == 64
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens = enc.vit(x)  # (2, 1 + 4 + 16, 32)
        out = enc(x)
    assert tokens.shape == (2, 21, 32)
    assert torch.allclose(out, torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1))
    assert not torch.allclose(out[:, 32:], tokens[:, 1:].mean(1))  # registers would change the mean


def test_unknown_mlp_layer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model_kwargs\.mlp_layer: 'Nope' is not one of SwiGLUPacked"):
        gp.build("tile_encoder", "dinov2_vit", weights="random", model_kwargs={"mlp_layer": "Nope"})


def test_hub_config_pooling_does_not_block_loading():
    """A hub config.json whose model_args differ only in pooling/dynamic size (no tensor changes) is accepted;
    one with another depth is refused with the params to use."""
    from gigapath_core.errors import WeightsError

    enc = gp.build("tile_encoder", "dinov2_vit", weights="random", model_name="vit_small_patch16_224",
                   model_kwargs={"depth": 2, "global_pool": "token"})
    enc.check_config({"architecture": "vit_small_patch16_224",
                      "model_args": {"depth": 2, "global_pool": "", "dynamic_img_size": True}}, "hub")
    with pytest.raises(WeightsError, match="depth"):
        enc.check_config({"architecture": "vit_small_patch16_224", "model_args": {"depth": 3}}, "hub")
    swiglu = gp.build("tile_encoder", "dinov2_vit", weights="random", model_name="vit_small_patch16_224",
                      model_kwargs={"depth": 1, "mlp_layer": "SwiGLUPacked", "act_layer": "silu"})
    swiglu.check_config({"architecture": "vit_small_patch16_224", "model_args": {
        "depth": 1, "mlp_layer": "timm.layers.mlp.SwiGLUPacked", "act_layer": "torch.nn.SiLU"}}, "hub")  # same layers
    with pytest.raises(WeightsError, match="mlp_layer"):
        swiglu.check_config({"architecture": "vit_small_patch16_224", "model_args": {"mlp_layer": "Mlp"}}, "hub")


def test_doctor_reports_zoo_weights_found_offline(tmp_path, monkeypatch):
    """`gigapath doctor` lists each zoo preset's weights: found under $GIGAPATH_WEIGHTS, or why not."""
    from gigapath_core.doctor import report

    (tmp_path / "kaiko-vits16").mkdir()
    (tmp_path / "kaiko-vits16" / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("GIGAPATH_WEIGHTS", str(tmp_path))
    weights = report()["weights"]
    assert not weights["kaiko-vits16/tile_encoder"].startswith("not available")
    assert str(tmp_path / "kaiko-vits16" / "model.safetensors") in weights["kaiko-vits16/tile_encoder"]
    assert weights["uni/tile_encoder"].startswith("not available offline")


@pytest.fixture(scope="module")
def real_tile(example_slide) -> np.ndarray:
    """A 256x256 tissue tile of the bundled CMU-1-Small-Region slide (OpenSlide, level 0)."""
    wsi = gp.build("slide_reader", "openslide").open(str(example_slide))
    try:
        return wsi.read_region((1000, 1400), 0, (256, 256))
    finally:
        wsi.close()


def test_zoo_page_is_the_command_output(capsys):
    """docs/zoo.md is exactly `gigapath presets --markdown` (regenerate it with that command after a card changes)."""
    from pathlib import Path

    from gigapath_core.cli import main

    assert main(["presets", "--markdown"]) == 0
    page = capsys.readouterr().out
    assert (Path(__file__).resolve().parent.parent / "docs" / "zoo.md").read_text() == page
    assert "| `uni` | dinov2_vit | 1024 | CLS token | 303.4 M | 0.5 |" in page
    assert "| `virchow2` | dinov2_vit | 2560 |" in page and "| `h-optimus-0` | dinov2_vit | 1536 |" in page
    assert "1.13 B" in page and "## task head" not in page  # task heads have no presets (yet)


def test_zoo_ablation_example_validates(tmp_path):
    """examples/zoo_ablation.yaml validates (every variant's finetune config, heads included) once the embedding
    folders it names exist; each folder is named after a registry tile-encoder preset."""
    import shutil
    import sys
    from pathlib import Path

    import yaml

    from gigapath_core.finetune.ablation import load_ablation_config

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _zoo_plugins import new_heads_registered
    from test_finetune import make_cohort

    example = Path(__file__).resolve().parent.parent / "examples" / "zoo_ablation.yaml"
    raw = yaml.safe_load(example.read_text())
    folders = {raw["base"]["data"]["embeddings"]} | {v["data.embeddings"] for v in raw["variants"].values()
                                                      if "data.embeddings" in v}
    encoders = {f.rsplit("/", 1)[1] for f in folders}
    assert encoders <= set(load_registry()) and len(encoders) >= 5
    (tmp_path / "examples").mkdir()
    shutil.copy(example, tmp_path / "examples")
    for name in encoders:  # stand-in embeddings (same slide ids and labels) where the real ones would be
        make_cohort(tmp_path / "out" / "zoo", n_patients=6, folder=name)
    with new_heads_registered():
        cfg, variants = load_ablation_config(raw, tmp_path / "examples")
    heads = {v.model.head.name for v in variants.values()}
    assert heads == {"abmil", "transmil", "clam_sb", "clam_mb"} and cfg.reference in variants
    assert {str(Path(v.output).parent) for v in variants.values()} == {str(tmp_path / "out" / "zoo" / "ablation")}



def test_prov_gigapath_slide_encoder_card_counts_the_released_checkpoint(shared_data):
    """The slide-encoder card's parameter count is the released slide_encoder.pth's (the sum of the shapes in
    its key list, 86,330,880 in the paper's code), and the model the preset builds has exactly it."""
    card = load_registry()["prov-gigapath"].slide_encoder
    rows = [line.split("\t") for line in
            (shared_data / "reference" / "gigapath_slide_enc12l768d_state_dict_keys.txt").read_text().splitlines()]
    released = sum(int(np.prod([int(v) for v in shape.strip("()").split(",") if v.strip()])) for _, shape, _ in rows)
    with torch.device("meta"):
        enc = gp.build("slide_encoder", "prov-gigapath", weights="random")
    assert card.params_count == released == sum(p.numel() for p in enc.parameters()) == 86_330_880
