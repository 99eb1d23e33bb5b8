"""LongNet slide encoder (``longnet`` plugin): checkpoint layout, numerical parity with the released reference
implementation, and the public API (Xu et al. 2024, Methods: slide encoder (LongNet);
``../shared/data/reference/README.md``)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from gigapath_core import build
from gigapath_core.errors import ConfigError, WeightsError
from gigapath_plugins.slide_encoders.longnet import LongNetSlideEncoder, reference_segment_lengths
from gigapath_plugins.slide_encoders.longnet.position import coords_to_cells, position_embedding, position_index

REF = "reference/gigapath_slide_enc12l768d_parity.safetensors"
KEYS = "reference/gigapath_slide_enc12l768d_state_dict_keys.txt"


def released_keys(shared_data):
    rows = [line.split("\t") for line in (shared_data / KEYS).read_text().splitlines() if line.strip()]
    return [(name, tuple(int(v) for v in shape.strip("()").split(",") if v.strip()), dtype)
            for name, shape, dtype in rows]


def fixture_weights(keys) -> dict[str, torch.Tensor]:
    """The README's weight rule: per key, randn(seed=crc32(name)) in float64, scaled, then float32."""
    sd = {}
    for name, shape, _ in keys:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2:
            t = t / math.sqrt(shape[-1])
        elif name.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t = 0.02 * t
        sd[name] = t.float()
    return sd


@pytest.fixture(scope="module")
def ref(shared_data):
    from safetensors.torch import load_file

    return load_file(str(shared_data / REF))


@pytest.fixture(scope="module")
def weights(shared_data):
    return fixture_weights(released_keys(shared_data))


def loaded(weights, **params) -> LongNetSlideEncoder:
    with torch.device("meta"):  # skip the random initialisation: every tensor is loaded
        m = LongNetSlideEncoder(**params)
    m.to_empty(device="cpu")
    m.load_state_dict(weights, strict=True)
    return m.eval()


@pytest.fixture(scope="module")
def model64(weights):
    return loaded(weights).double()


@pytest.fixture(scope="module")
def model32(weights):
    return loaded(weights)


# ----------------------------------------------------------------------------------------- layout
def test_state_dict_is_the_released_layout(shared_data):
    keys = released_keys(shared_data)
    assert len(keys) == 247
    sd = LongNetSlideEncoder().state_dict()
    assert [(k, tuple(v.shape), str(v.dtype)) for k, v in sd.items()] == keys


def _param_formula(E, depth, din=1536, ffn_ratio=4):
    """Parameters of the architecture in Xu et al. 2024, Methods: slide encoder (LongNet), counted by hand: CLS, input
    Linear, per layer q/k/v/out
    Linears + 4 LayerNorms of E (inner_attn_ln, two pre-norms) + FFN (fc1, fc2, LayerNorm of F), final LNs."""
    F = ffn_ratio * E
    layer = 4 * (E * E + E) + 2 * E + 2 * (2 * E) + (E * F + F) + (F * E + E) + 2 * F
    return E + (din * E + E) + depth * layer + 2 * E + 2 * E


def test_parameter_counts():
    from gigapath_core.api import validate_params

    assert _param_formula(768, 12) == 86_330_880  # the released checkpoint (Xu et al. 2024)
    for E, depth in ((768, 12), (1024, 24), (1536, 12)):  # the presets; the larger ones are unreleased variants
        name = "prov-gigapath" if E == 768 else f"gigapath-slide-enc{depth}l{E}d"
        info, params, _ = validate_params("slide_encoder", name)
        with torch.device("meta"):  # shapes only, no memory
            m = info.cls.from_params(params)
        assert m.embed_dim == E and len(m.encoder.layers) == depth
        assert sum(p.numel() for p in m.parameters()) == _param_formula(E, depth)


def test_default_segment_lengths_are_the_released_ones():
    assert reference_segment_lengths() == [1024, 5792, 32768, 185363, 1048576]  # Xu et al. 2024, Methods
    m = LongNetSlideEncoder(depth=1)
    assert m.segment_lengths == [1024, 5792, 32768, 185363, 1048576] and m.dilated_ratios == [1, 2, 4, 8, 16]


# ----------------------------------------------------------------------------------------- parity
def test_position_index_matches_reference(ref):
    cells = coords_to_cells(ref["A_coords"])
    assert torch.equal(position_index(cells), ref["A_pos_index"])


def test_parity_float64_case_a(model64, ref):
    x, c = ref["A_tile_embeds"], ref["A_coords"]
    m = model64
    with torch.no_grad():
        enc_in, _, _ = m.embed_tokens(x, c)
        assert (enc_in - ref["A_f64_encoder_input"]).abs().max() < 1e-12
        layer0 = m.encoder.layers[0]
        sa = layer0.self_attn(layer0.self_attn_layer_norm(enc_in))
        assert (sa - ref["A_f64_layer0_self_attn_out"]).abs().max() < 1e-12
        states, _, _ = m.forward_features(x, c, all_layers=True)
        assert (states[1] - ref["A_f64_layer0_tokens_out"]).abs().max() < 1e-6
        # Layer-11 tokens reach |21.8|; the FFN's float32 GELU (a README behaviour) rounds differently across
        # torch builds: float32- vs float64-evaluated GELU alone moves them by 1.5e-6 here. 5e-6 = 2.3e-7 relative.
        assert (states[12] - ref["A_f64_layer11_tokens_out"]).abs().max() < 5e-6
        # the API on two of the four outputs (all four are checked in float32 below) ...
        for name, kwargs in [("cls_default", {}),
                             ("globalpool_all_layers", {"global_pool": True, "all_layer_embed": True})]:
            got = m(x, c, **kwargs)
            want = ref[f"A_f64_{name}"]
            assert got.shape == want.shape and got.dtype == torch.float64
            assert (got - want).abs().max() <= 1e-6, name
        # ... and the other two from the token states (README: each state through `norm`, none through the
        # final encoder LayerNorm)
        cls_all = torch.stack([m.norm(h[:, 0]) for h in states])
        gp = m.norm(m.encoder.layer_norm(states[-1])[:, 1:].mean(1))
        assert (cls_all - ref["A_f64_all_layer_cls"]).abs().max() <= 1e-6
        assert (gp - ref["A_f64_globalpool_default"]).abs().max() <= 1e-6


def test_parity_float64_case_c_batch(model64, ref):
    with torch.no_grad():
        got = model64(ref["C_tile_embeds"], ref["C_coords"], all_layer_embed=True)
    assert got.shape == (13, 2, 768)
    assert (got - ref["C_f64_all_layer_cls"]).abs().max() <= 1e-6


CASES32 = [("cls_default", {}), ("all_layer_cls", {"all_layer_embed": True}),
           ("globalpool_default", {"global_pool": True}),
           ("globalpool_all_layers", {"global_pool": True, "all_layer_embed": True})]


def test_parity_float32(model32, ref):
    x, c = ref["A_tile_embeds"].float(), ref["A_coords"]
    with torch.no_grad():
        for name, kwargs in CASES32:
            got = model32(x, c, **kwargs)
            assert got.dtype == torch.float32
            assert (got - ref[f"A_f32_{name}"]).abs().max() <= 1e-5, name


def test_parity_plain_pytorch_kernel(model32, ref):
    """The ``math`` attention backend (no fused kernel) meets the same tolerance."""
    x, c = ref["A_tile_embeds"].float(), ref["A_coords"]
    for layer in model32.encoder.layers:
        layer.self_attn.backend = "math"
    try:
        with torch.no_grad():
            got = model32(x, c, all_layer_embed=True)
    finally:
        for layer in model32.encoder.layers:
            layer.self_attn.backend = "auto"
    assert (got - ref["A_f32_all_layer_cls"]).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------- weights
def test_released_checkpoint_formats_load_strictly(tmp_path, monkeypatch, weights, model32, ref):
    from safetensors.torch import save_file

    from gigapath_core.weights import read_state_dict

    pth = tmp_path / "prov-gigapath" / "slide_encoder.pth"
    pth.parent.mkdir()
    torch.save({"model": weights}, pth)  # the released file's layout: {"model": state_dict}
    st = tmp_path / "slide_encoder.safetensors"
    save_file(weights, str(st))
    monkeypatch.setenv("GIGAPATH_WEIGHTS", str(tmp_path))  # the preset's first source; no hub access
    m = build("slide_encoder", "prov-gigapath")
    assert m.weights_source == "${GIGAPATH_WEIGHTS}/prov-gigapath/slide_encoder.pth" and not m.training
    x, c = ref["A_tile_embeds"].float(), ref["A_coords"]
    with torch.no_grad():
        assert (m(x, c) - ref["A_f32_cls_default"]).abs().max() <= 1e-5
    m.load_weights(read_state_dict(st), str(st))  # what build(weights=<file>.safetensors) calls
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), model32.state_dict().values()))
    broken = dict(weights)
    broken["encoder.layers.3.ffn.fc1.bais"] = broken.pop("encoder.layers.3.ffn.fc1.bias")
    with pytest.raises(WeightsError, match="missing 1: encoder.layers.3.ffn.fc1.bias"):
        m.load_weights(broken, "broken.pth")


# ----------------------------------------------------------------------------------------- positions
def test_position_embedding_equals_full_table_rows():
    """Against the reference's full-table construction (MAE 2-D sin-cos: np.meshgrid(w, h), first half from the
    grid's first component), written independently with numpy for a 7 x 7 grid and D = 16."""
    n, D = 7, 16

    def sincos(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32))
    table = np.concatenate([sincos(D // 2, grid[0]), sincos(D // 2, grid[1])], axis=1)
    table = np.concatenate([np.zeros((1, D)), table]).astype(np.float32)  # row 0: CLS
    cells = torch.tensor([[[0, 0], [3, 5], [6, 1], [2, 6]]])
    got = position_embedding(cells, D, ngrids=n)
    want = torch.from_numpy(table[position_index(cells, n).numpy()])
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad,what", [((256000.0, 0.0), "x=256000, y=0"), ((-1.0, 5.0), "x=-1, y=5"),
                                      ((0.0, float("nan")), "x=0, y=nan")])
def test_coordinates_outside_grid_raise(bad, what):
    m = LongNetSlideEncoder(depth=1)
    coords = torch.tensor([[[0.0, 0.0], list(bad), [512.0, 256.0]]])
    with pytest.raises(ConfigError, match=rf"coords: tile 1 of slide 0 at grid px \({what}"):
        m(torch.zeros(1, 3, 1536), coords)
    # the same coordinate at a padding position is ignored
    m.eval()
    out = m(torch.zeros(1, 3, 1536), coords, padding_mask=torch.tensor([[False, True, False]]))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------- API
def small(**kw):
    torch.manual_seed(0)
    p = dict(in_chans=24, embed_dim=32, depth=2, num_heads=4, segment_lengths=[8, 16, 32], dilated_ratios=[1, 2, 4],
             dropout=0.0, drop_path_rate=0.0)
    p.update(kw)
    return LongNetSlideEncoder(**p).double().eval()


def slide(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, 24, generator=g, dtype=torch.float64)
    cells = torch.randperm(400, generator=g)[:n]
    return x, torch.stack([cells % 20, cells // 20], -1)[None].double() * 256


def test_output_shapes_and_options():
    m = small()
    x, c = slide(45, 0)
    assert m(x, c).shape == (1, 32)
    assert m(x, c, all_layer_embed=True).shape == (3, 1, 32)
    emb, tokens = m(x, c, return_tile_tokens=True)
    assert emb.shape == (1, 32) and tokens.shape == (1, 45, 32)
    gp = m(x, c, global_pool=True)
    assert torch.allclose(gp, m.norm(m.forward_features(x, c)[0][-1][:, 1:].mean(1)))
    assert torch.equal(small(global_pool=True)(x, c), gp)
    assert small(all_layer_embed=True)(x, c).shape == (3, 1, 32)
    one = m(x[:, :1], c[:, :1])  # a single tile
    assert one.shape == (1, 32) and torch.isfinite(one).all()


def test_output_depends_on_tile_order():
    """The reference does not sort tiles; neither do we (README behaviour 4): the dilation groups and segments
    follow the sequence order."""
    m = small()
    x, c = slide(45, 7)
    perm = torch.arange(44, -1, -1)
    assert (m(x, c) - m(x[:, perm], c[:, perm])).abs().max() > 1e-3


@pytest.mark.parametrize("padding", ["reference", "masked"])
def test_padded_batch_equals_each_slide_alone(padding):
    m = small(segment_padding=padding)
    slides = [slide(n, s) for n, s in ((45, 1), (29, 2), (9, 3))]
    N = 50
    x = torch.zeros(3, N, 24, dtype=torch.float64)
    c = torch.full((3, N, 2), -7.0, dtype=torch.float64)  # garbage (off-grid) coordinates at padding
    mask = torch.ones(3, N, dtype=torch.bool)
    places = []
    for b, (xs, cs) in enumerate(slides):
        n = xs.shape[1]
        pos = torch.randperm(N, generator=torch.Generator().manual_seed(b))[:n].sort().values  # scattered
        x[b, pos], c[b, pos], mask[b, pos] = xs[0], cs[0], False
        places.append(pos)
    for kwargs in ({}, {"global_pool": True}, {"all_layer_embed": True}):
        batch, tokens = m(x, c, mask, return_tile_tokens=True, **kwargs)
        for b, (xs, cs) in enumerate(slides):
            alone, alone_tokens = m(xs, cs, return_tile_tokens=True, **kwargs)
            assert torch.allclose(batch[..., b, :], alone[..., 0, :], atol=1e-12), (kwargs, b)
            assert torch.allclose(tokens[b, places[b]], alone_tokens[0], atol=1e-12)
            assert not tokens[b, mask[b]].any()


def test_training_step_and_gradients():
    m = small(dropout=0.25, drop_path_rate=0.1).float().train()
    x, c = slide(45, 4)
    x = x.float()
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    target = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    (m(x, c) - target).pow(2).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "layers" in n)
    m2 = small().float()
    losses = []
    opt = torch.optim.SGD(m2.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        loss = (m2(x, c) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_activation_checkpointing_gives_the_same_gradients():
    x, c = slide(45, 5)
    grads = []
    for ckpt in (False, True):
        m = small(checkpoint_activations=ckpt).train()
        m(x, c, global_pool=True).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


def test_inference_weight_cache_follows_updates():
    import copy

    m = small()
    x, c = slide(20, 8)
    with torch.no_grad():
        m(x, c)
        m.encoder.layers[0].self_attn.k_proj.weight.mul_(1.5)  # in-place update, as an optimizer step
        cached = m(x, c)
    assert torch.allclose(cached, m(x, c), atol=1e-12)  # grad-enabled forward never uses the cache
    clone = copy.deepcopy(m)
    assert "_qkv_cache" not in vars(clone.encoder.layers[0].self_attn)
    with torch.no_grad():
        assert torch.equal(clone.double()(x, c), cached)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_forward(dtype, tol):
    m = small().float()
    x, c = slide(45, 6)
    want = m(x.float(), c)
    got = m.to(dtype)(x.to(dtype), c)
    assert got.dtype == dtype
    assert (got.float() - want).abs().max() < tol * want.abs().max()
