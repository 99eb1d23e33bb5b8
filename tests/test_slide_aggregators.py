"""Slide aggregators for ablations (``abmil_only``) and the slide-embedding stage (Xu et al. 2024, Methods: slide
encoder (LongNet); mutation prediction, cancer subtyping)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigapath_core import build
from gigapath_core.errors import ConfigError, SlideError
from gigapath_core.stages.slide_embedding import SLIDE_FILE, encode_slide, run_slide_embedding
from gigapath_core.store import read_h5, write_h5


def _tiles(n, d=24, seed=0):
    g = np.random.default_rng(seed)
    feats = g.standard_normal((n, d)).astype(np.float32)
    cells = g.choice(400, size=n, replace=False)
    coords = np.stack([cells % 20, cells // 20], 1).astype(np.int64) * 256
    return feats, coords


# ----------------------------------------------------------------------------------------- ABMIL
def test_abmil_matches_ilse_gated_attention():
    """Ilse et al. 2018, Eq. 9, written with numpy: a = softmax_i(w^T (tanh(V h_i) * sigm(U h_i))), z = sum a_i h_i."""
    torch.manual_seed(0)
    m = build("slide_encoder", "abmil_only", in_dim=24, attn_dim=8)
    feats, coords = _tiles(30)
    z = m(torch.from_numpy(feats)[None], torch.from_numpy(coords)[None]).detach().numpy()[0]
    V, bV = m.attention_v.weight.detach().numpy(), m.attention_v.bias.detach().numpy()
    U, bU = m.attention_u.weight.detach().numpy(), m.attention_u.bias.detach().numpy()
    w, bw = m.attention_w.weight.detach().numpy()[0], m.attention_w.bias.detach().numpy()[0]
    gate = np.tanh(feats @ V.T + bV) * (1 / (1 + np.exp(-(feats @ U.T + bU))))
    logits = gate @ w + bw
    a = np.exp(logits - logits.max())
    a /= a.sum()
    assert np.allclose(z, a @ feats, atol=1e-5)
    assert m.embed_dim == 24 and m.name == "abmil_only"


def test_abmil_padding_permutation_and_single_tile():
    torch.manual_seed(1)
    m = build("slide_encoder", "abmil_only", in_dim=24, proj_dim=16)
    feats, coords = (torch.from_numpy(a)[None] for a in _tiles(20, seed=2))
    alone, tokens = m(feats, coords, return_tile_tokens=True)
    assert alone.shape == (1, 16) and tokens.shape == (1, 20, 16)
    padded = torch.cat([feats, torch.randn(1, 5, 24)], 1)
    mask = torch.tensor([[False] * 20 + [True] * 5])
    assert torch.allclose(m(padded, None, mask), alone, atol=1e-6)
    perm = torch.randperm(20)
    assert torch.allclose(m(feats[:, perm], None), alone, atol=1e-6)
    one_out, one_h = m(feats[:, :1], None, return_tile_tokens=True)
    assert torch.allclose(one_out, one_h[:, 0], atol=1e-6)  # one tile: weight 1
    alone.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


# ----------------------------------------------------------------------------------------- stage
def small_longnet(**kw):
    torch.manual_seed(0)
    p = dict(in_chans=24, embed_dim=32, depth=2, num_heads=4, segment_lengths=[8, 16], dilated_ratios=[1, 2])
    p.update(kw)
    return build("slide_encoder", "longnet", weights="random", **p)


def _write_tiles(d, feats, coords):
    # format_version 2: coords level-0 px (here a 0.25 µm/px slide: twice the grid px), grid_coords grid px
    write_h5(d / "tile_embeddings.h5", {"features": feats, "coords": coords * 2, "grid_coords": coords},
             {"tile_encoder": "test", "weights_source": "random"})


@pytest.mark.parametrize("n", [1, 37])
def test_stage_writes_slide_embedding(tmp_path, n):
    enc = small_longnet()
    feats, coords = _tiles(n)
    _write_tiles(tmp_path, feats, coords)
    emb = run_slide_embedding(enc, tmp_path, "tile_embeddings.h5", {"slide_encoder": "longnet"},
                              device=torch.device("cpu"), precision="auto")
    data, attrs = read_h5(tmp_path / SLIDE_FILE)
    assert data["embedding"].shape == (32,) and data["embedding"].dtype == np.float32
    assert attrs["n_tiles"] == n and attrs["embedding_layout"] == "slide" and attrs["tile_encoder"] == "test"
    with torch.no_grad():
        want = enc(torch.from_numpy(feats)[None], torch.from_numpy(coords)[None].double())[0].numpy()
    assert np.allclose(data["embedding"], want, atol=1e-6) and np.array_equal(emb, data["embedding"])


def test_stage_all_layers_and_zero_tiles(tmp_path):
    enc = small_longnet(all_layer_embed=True)
    feats, coords = _tiles(10)
    assert encode_slide(enc, feats, coords).shape == (3, 32)  # input + 2 layers
    _write_tiles(tmp_path, feats[:0], coords[:0])
    assert run_slide_embedding(enc, tmp_path, "tile_embeddings.h5", {}, device=torch.device("cpu"),
                               precision="fp32") is None
    assert not (tmp_path / SLIDE_FILE).exists()


def test_stage_errors_are_per_slide(tmp_path):
    enc = small_longnet()
    feats, coords = _tiles(10)
    coords[4] = (300_032, 512)  # off the 1000 x 1000 grid of 256-px cells (cell 1172)
    _write_tiles(tmp_path, feats, coords)
    with pytest.raises(SlideError, match=r"tile 4 of slide 0 at grid px \(x=300032, y=512\)"):
        run_slide_embedding(enc, tmp_path, "tile_embeddings.h5", {}, device=torch.device("cpu"), precision="fp32")
    feats, coords = _tiles(10)
    feats[7, 3] = np.nan
    _write_tiles(tmp_path, feats, coords)
    with pytest.raises(SlideError, match=r"non-finite \(NaN/Inf\) for 1 of 10 tiles, first tile 7, written by tile encoder"):
        run_slide_embedding(enc, tmp_path, "tile_embeddings.h5", {}, device=torch.device("cpu"), precision="fp32")
    with pytest.raises(ConfigError, match="tile embeddings are 16-d but the slide encoder takes 24-d"):
        encode_slide(enc, feats[:, :16], coords)
    assert not (tmp_path / SLIDE_FILE).exists()
