"""Tile encoders: the Prov-GigaPath ViT-g/14 preset, the ViT-S/14 preset, and the CTransPath / REMEDIS / HIPT
baselines (architecture, published dims and parameter counts, input transforms, checkpoint key layouts).

Numbers are stated with their source. The ViT-g test builds the 1.13 B-parameter model once per session
(~4.5 GB RAM, ~25 s to build here) and runs it on one tile.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

import gigapath_core as gp
from gigapath_core.errors import ConfigError, WeightsError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # Xu et al. 2024, Methods: tile encoder
# Xu et al. 2024, Methods: tile encoder: timm vit_giant_patch14_dinov2 with these kwargs is the Prov-GigaPath tile
# encoder
SPEC_VITG = dict(img_size=224, patch_size=16, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334,
                 init_values=1e-5, num_classes=0)
SPEC_VITG_PARAMS = 1_134_953_984  # Xu et al. 2024, Methods: tile encoder


@pytest.fixture(scope="module")
def real_tile(example_slide) -> np.ndarray:
    """A 256x256 tissue tile of the bundled CMU-1-Small-Region slide, read with OpenSlide at level 0."""
    wsi = gp.build("slide_reader", "openslide").open(str(example_slide))
    try:
        tile = wsi.read_region((1000, 1400), 0, (256, 256))
    finally:
        wsi.close()
    assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8 and tile.std() > 10  # not blank
    return tile


def to_pil(tile):
    from PIL import Image

    return Image.fromarray(tile)


# ------------------------------------------------------------------------------------- Prov-GigaPath
@pytest.fixture(scope="class")
def vitg(tmp_path_factory):
    """The ``prov-gigapath`` preset loaded from a checkpoint saved by timm itself (the hub's key layout).

    The reference is timm ``vit_giant_patch14_dinov2`` built with the paper's kwargs, on the meta device and then
    materialised with a distinct constant in every tensor (the point is the layout, and a swapped key would
    show), saved as ``pytorch_model.bin`` like the ``prov-gigapath/prov-gigapath`` hub file, and freed before
    the preset is built, so only one 4.5 GB copy is in RAM at a time.
    """
    import timm
    from torch.utils.serialization import config

    with torch.device("meta"):
        ref = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, **SPEC_VITG)
    ref = ref.to_empty(device="cpu")
    with torch.no_grad():
        for i, p in enumerate(ref.parameters()):
            p.fill_((i + 1) * 1e-5)
    path = tmp_path_factory.mktemp("prov-gigapath") / "pytorch_model.bin"
    crc, config.save.compute_crc32 = config.save.compute_crc32, False  # 4.5 GB: skip the zip checksum
    try:
        torch.save(ref.state_dict(), path)
    finally:
        config.save.compute_crc32 = crc
    del ref
    gc.collect()
    enc = gp.build("tile_encoder", "prov-gigapath", weights=str(path))
    with torch.inference_mode():
        out = enc(torch.randn(1, 3, 224, 224))  # one forward (B = 1): ~2 s here, 7 s on a busy machine
    yield enc, out, path
    del enc
    gc.collect()
    path.unlink()  # 4.5 GB: do not leave it in pytest's kept temp folders


class TestProvGigaPath:
    """The three checks share one ViT-g build (class scope: freed before the other tests run)."""

    def test_parameters_and_shape(self, vitg):
        enc, out, path = vitg
        assert sum(p.numel() for p in enc.parameters()) == SPEC_VITG_PARAMS
        assert enc.embed_dim == 1536
        assert out.shape == (1, 1536) and out.dtype == torch.float32  # (B, 3, 224, 224) -> (B, 1536), B = 1
        assert torch.isfinite(out).all()

    def test_loads_timm_checkpoint_strictly(self, vitg):
        """The timm-layout state dict (no ``model.`` prefix) loads strictly: every tensor of the file, by name."""
        enc, out, path = vitg
        assert enc.weights_source == str(path)
        saved = torch.load(path, mmap=True, weights_only=True)
        own = enc.model.state_dict()
        assert set(saved) == set(own) and not any(k.startswith("model.") for k in saved)
        for k, v in saved.items():
            assert torch.equal(own[k], v), k

    def test_transform_is_torchvision_composition(self, vitg, real_tile):
        """Xu et al. 2024, Methods: tile encoder: Resize(256, bicubic) -> CenterCrop(224) -> ToTensor ->
        Normalize(ImageNet)."""
        enc = vitg[0]
        ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                         T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        for tile in (real_tile, real_tile[:200, :230]):  # a 256-px tile, and a non-square crop that gets resized
            got = enc.transform(tile)
            assert got.shape == (3, 224, 224) and got.dtype == torch.float32
            assert torch.equal(got, ref(to_pil(tile)))


# ------------------------------------------------------------------------------------------ ViT-S/14
def test_vits14_preset_and_any_timm_vit(real_tile):
    enc = gp.build("tile_encoder", "dinov2-vits14", weights="random")
    assert enc.embed_dim == 384  # ViT-S: 384-d (Touvron et al., DeiT, ICML 2021, Table 1; DINOv2 ViT-S/14 uses it)
    with torch.inference_mode():
        assert enc(enc.transform(real_tile)[None]).shape == (1, 384)
    other = gp.build("tile_encoder", "dinov2_vit", weights="random", model_name="vit_tiny_patch16_224", img_size=224)
    assert other.embed_dim == 192  # ViT-Ti: 192-d (Touvron et al., DeiT, Table 1)
    with pytest.raises(ConfigError, match=r"tile_encoder\.params\.model_name: timm has no model 'vit_nope'"):
        gp.build("tile_encoder", "dinov2_vit", weights="random", model_name="vit_nope")


# ---------------------------------------------------------------------------------------- CTransPath
def released_ctranspath_layout(current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key layout of TransPath's ``ctranspath.pth`` (``td["model"]``, a modified timm 0.5.4 Swin).

    timm 0.5.4 (``timm/models/swin_transformer.py``): each BasicLayer ends with its PatchMerging
    (``layers.{i}.downsample``, i = 0..2), and every block stores ``attn.relative_position_index`` (49x49)
    and, for shifted blocks (odd blocks of stages 0-2; stage 3 is one 7x7 window), ``attn_mask``
    (windows x 49 x 49) as persistent buffers. Built from the current model's tensors by that rule.
    """
    import re

    old = {}
    for k, v in current.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        old[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    windows = {0: 64, 1: 16, 2: 4}  # (56/7)^2, (28/7)^2, (14/7)^2
    for stage, depth in enumerate((2, 2, 6, 2)):
        for b in range(depth):
            old[f"layers.{stage}.blocks.{b}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
            if b % 2 == 1 and stage < 3:
                old[f"layers.{stage}.blocks.{b}.attn_mask"] = torch.zeros(windows[stage], 49, 49)
    return old


def test_ctranspath_dim_params_and_released_layout(tmp_path, real_tile):
    torch.manual_seed(0)
    enc = gp.build("tile_encoder", "ctranspath", weights="random")
    # 768-d (Wang et al. 2022). Swin-T has 28,288,354 parameters with its 1,000-class head (Liu et al. 2021,
    # Table 1: 28M; timm swin_tiny_patch4_window7_224); CTransPath drops the head (768*1000 + 1000) and swaps
    # the 4x4 patch conv (3*96*16 + 96) for the conv stem (3*12*9 + 2*12 + 12*24*9 + 2*24 + 24*96 + 96).
    assert enc.embed_dim == 768
    stem = 3 * 12 * 9 + 2 * 12 + 12 * 24 * 9 + 2 * 24 + 24 * 96 + 96
    assert sum(p.numel() for p in enc.parameters()) == 28_288_354 - (768 * 1000 + 1000) - (3 * 96 * 16 + 96) + stem
    released = released_ctranspath_layout(enc.model.state_dict())
    # 16 stem keys (3 convs, 2 BNs with 5 entries each, LayerNorm) + 12 blocks x 14 + 5 attn masks
    # + 3 patch-merging layers x 3 + final norm 2 = 200
    assert len(released) == 200
    assert released["layers.0.downsample.reduction.weight"].shape == (192, 384)
    assert released["patch_embed.proj.0.weight"].shape == (12, 3, 3, 3)
    torch.save({"model": released}, tmp_path / "ctranspath.pth")
    with torch.inference_mode():
        x = enc.transform(real_tile)[None]
        expected = enc(x)
    torch.manual_seed(1)
    loaded = gp.build("tile_encoder", "ctranspath", weights=str(tmp_path / "ctranspath.pth"))
    with torch.inference_mode():
        out = loaded(x)
    assert out.shape == (1, 768)
    torch.testing.assert_close(out, expected)
    del released["layers.2.blocks.3.mlp.fc1.bias"]
    torch.save({"model": released}, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match=r"missing 1: layers\.2\.blocks\.3\.mlp\.fc1\.bias"):
        gp.build("tile_encoder", "ctranspath", weights=str(tmp_path / "broken.pth"))


def test_ctranspath_transform(real_tile):
    """TransPath get_features_CTransPath.py: Resize(224) -> ToTensor -> Normalize(ImageNet)."""
    enc = gp.build("tile_encoder", "ctranspath", weights="random")
    ref = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.equal(enc.transform(real_tile), ref(to_pil(real_tile)))


# ------------------------------------------------------------------------------------------- REMEDIS
def test_remedis_dim_params_and_transform(real_tile):
    enc = gp.build("tile_encoder", "remedis", weights="random")
    # BiT ResNet-152x2: 4,096-d (2 x 2,048); 236.3 M parameters with a 1,000-class head (timm model card
    # resnetv2_152x2_bit.goog_in21k_ft_in1k; Kolesnikov et al., BiT, 2020), the head being 4096*1000 + 1000
    n = sum(p.numel() for p in enc.parameters())
    assert enc.embed_dim == 4096
    assert round((n + 4096 * 1000 + 1000) / 1e5) / 10 == 236.3
    assert torch.equal(enc.transform(real_tile), T.Compose([T.Resize(224), T.ToTensor()])(to_pil(real_tile)))
    with torch.inference_mode():
        assert enc(torch.rand(1, 3, 64, 64)).shape == (1, 4096)


def test_remedis_loads_bit_variable_names(tmp_path):
    """BiT's published names (google-research/big_transfer; HWIO kernels), on the small R50x1 BiT."""
    torch.manual_seed(0)
    src = gp.build("tile_encoder", "remedis", weights="random", model_name="resnetv2_50x1_bit")
    arrays = {}
    for k, v in src.model.state_dict().items():
        a = v.numpy()
        if k == "stem.conv.weight":
            arrays["resnet/root_block/standardized_conv2d/kernel"] = a.transpose(2, 3, 1, 0)
        elif k.startswith("norm."):
            arrays["resnet/group_norm/" + ("gamma" if k.endswith("weight") else "beta")] = a
        else:
            _, s, _, b, layer, *rest = k.split(".")
            unit = f"resnet/block{int(s) + 1}/unit{int(b) + 1:02d}/"
            if layer == "downsample":
                arrays[unit + "a/proj/standardized_conv2d/kernel"] = a.transpose(2, 3, 1, 0)
            elif layer.startswith("conv"):
                arrays[unit + "abc"[int(layer[-1]) - 1] + "/standardized_conv2d/kernel"] = a.transpose(2, 3, 1, 0)
            else:
                gn = "gamma" if rest[0] == "weight" else "beta"
                arrays[unit + "abc"[int(layer[-1]) - 1] + "/group_norm/" + gn] = a
    arrays["resnet/head/conv2d/kernel"] = np.zeros((1, 1, 2048, 10), np.float32)  # a classifier: left out
    np.savez(tmp_path / "bit.npz", **arrays)
    torch.manual_seed(1)
    enc = gp.build("tile_encoder", "remedis", weights=str(tmp_path / "bit.npz"), model_name="resnetv2_50x1_bit")
    for k, v in src.model.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------------- HIPT
def hipt_vit_s16_params() -> int:
    """DINO ViT-S/16 (HIPT vision_transformer.py vit_small: 384-d, 12 blocks, MLP 1536, 224-px table)."""
    d, h = 384, 1536
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    return (3 * 16 * 16 * d + d) + d + 197 * d + 12 * block + 2 * d


def hipt_vit4k_xs_params() -> int:
    """HIPT vision_transformer4k.py vit4k_xs: phi Linear 384->192, 192-d, 6 blocks, MLP 768, 1 + 14x14 table."""
    d, h = 192, 768
    block = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    return (384 * d + d) + d + 197 * d + 6 * block + 2 * d


def dino_checkpoint(teacher: dict, d: int) -> dict:
    """A DINO training checkpoint as HIPT released it: teacher/student = backbone + projection head, args."""
    # DINO head key names; the released out_dim is 65,536, shortened here to keep the file small
    head = {"head.mlp.0.weight": torch.zeros(2048, d), "head.mlp.0.bias": torch.zeros(2048),
            "head.last_layer.weight_g": torch.ones(1024, 1), "head.last_layer.weight_v": torch.zeros(1024, 256)}
    return {"teacher": {**{"backbone." + k: v for k, v in teacher.items()}, **head},
            "student": {**{"backbone." + k: torch.zeros_like(v) for k, v in teacher.items()}, **head},
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536), "epoch": 100}


def dino_interpolated(pos_embed: torch.Tensor, n: int) -> torch.Tensor:
    """DINO/HIPT interpolate_pos_encoding for an n x n grid: bicubic, scale_factor (n + 0.1) / 14."""
    grid = pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((n + 0.1) / 14, (n + 0.1) / 14), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, n * n, -1)], dim=1)


def test_hipt_dim_params_transform_and_released_layout(tmp_path, real_tile):
    import timm

    torch.manual_seed(0)
    enc = gp.build("tile_encoder", "hipt", weights="random")
    assert enc.embed_dim == 384  # HIPT ViT-256: 384-d CLS (Chen et al. 2022)
    assert sum(p.numel() for p in enc.parameters()) == hipt_vit_s16_params() == 21_665_664  # DINO ViT-S/16: 21 M
    ref_t = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])  # HIPT eval_transforms
    x = enc.transform(real_tile)[None]
    assert torch.equal(x[0], ref_t(to_pil(real_tile))) and x.shape == (1, 3, 256, 256)
    teacher = {k: v.clone() for k, v in enc.model.state_dict().items()}
    assert teacher["pos_embed"].shape == (1, 197, 384)  # trained at 224 px: 1 + 14 x 14
    torch.save(dino_checkpoint(teacher, 384), tmp_path / "vit256_small_dino.pth")
    torch.manual_seed(1)
    loaded = gp.build("tile_encoder", "hipt", weights=str(tmp_path / "vit256_small_dino.pth"))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in teacher.items())  # teacher, not student
    # a 256-px tile: DINO resizes the 14x14 table to 16x16 on the fly; a plain timm ViT built for 256 px with
    # that resized table (computed here with DINO's formula) must give the same CLS embedding
    plain = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=256).eval()
    sd = dict(teacher, pos_embed=dino_interpolated(teacher["pos_embed"], 16))
    plain.load_state_dict(sd)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), plain(x), rtol=1e-4, atol=1e-5)


def test_hipt_region_aggregator(tmp_path):
    torch.manual_seed(0)
    agg = gp.build("slide_encoder", "hipt_region", weights="random")
    assert (agg.in_dim, agg.embed_dim) == (384, 192)  # HIPT ViT-4K: 384-d tiles -> 192-d regions
    assert sum(p.numel() for p in agg.parameters()) == hipt_vit4k_xs_params() == 2_781_504
    own = {k: v.clone() for k, v in agg.state_dict().items()}
    assert own["phi.0.weight"].shape == (192, 384) and own["pos_embed"].shape == (1, 197, 192)
    torch.save(dino_checkpoint(own, 192), tmp_path / "vit4k_xs_dino.pth")
    torch.manual_seed(1)
    agg = gp.build("slide_encoder", "hipt_region", weights=str(tmp_path / "vit4k_xs_dino.pth"))
    assert all(torch.equal(agg.state_dict()[k], v) for k, v in own.items())

    # one full 4,096-px region at grid origin (16 x 16 tiles, x = col*256, y = row*256) plus 3 tiles of the
    # region to its right; HIPT feeds the region as a (1, 384, rows, cols) grid, flattened row-major
    g = torch.Generator().manual_seed(2)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    full = torch.stack([cols.flatten() * 256, rows.flatten() * 256], 1)
    extra = torch.tensor([[4096, 0], [4096 + 256, 256], [4096 + 15 * 256, 15 * 256]])
    coords = torch.cat([full, extra]).float()
    feats = torch.randn(len(coords), 384, generator=g)
    with torch.inference_mode():
        regions, origins, tokens = agg.region_embeddings(feats, coords, return_tile_tokens=True)
        assert origins.tolist() == [[0, 0], [4096, 0]] and regions.shape == (2, 192) and tokens.shape == (259, 192)
        # HIPT VisionTransformer4K.forward on the full region, written out from the repository's code
        grid = feats[:256].reshape(16, 16, 384).permute(2, 0, 1)[None]  # (1, 384, rows, cols)
        x = agg.phi(grid.flatten(2, 3).transpose(1, 2))
        x = torch.cat([agg.cls_token, x], 1) + dino_interpolated(agg.pos_embed, 16)
        for blk in agg.blocks:
            x = blk(x)
        x = agg.norm(x)
        torch.testing.assert_close(regions[0], x[0, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tokens[:256], x[0, 1:], rtol=1e-4, atol=1e-5)
        # tile order does not matter: permuted input, same slide embedding, permuted tile tokens
        perm = torch.randperm(len(coords), generator=g)
        slide, tok = agg(feats[None], coords[None], return_tile_tokens=True)
        slide_p, tok_p = agg(feats[perm][None], coords[perm][None], return_tile_tokens=True)
        torch.testing.assert_close(slide, slide_p, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tok[0, perm], tok_p[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(slide[0], regions.mean(0))
        # padding positions are ignored
        pad = torch.cat([feats, torch.randn(5, 384, generator=g)])[None]
        pc = torch.cat([coords, torch.full((5, 2), 99 * 4096.0)])[None]
        mask = torch.zeros(1, len(coords) + 5, dtype=torch.bool)
        mask[0, -5:] = True
        torch.testing.assert_close(agg(pad, pc, padding_mask=mask), slide, rtol=1e-4, atol=1e-5)
