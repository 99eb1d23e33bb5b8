"""Task heads: gated-attention ABMIL (Ilse et al., ICML 2018, eq. 9) and the linear head."""

from __future__ import annotations

import pytest
import torch

import gigapath_core as gp
from gigapath_core.errors import ConfigError


def _abmil(**kw):
    torch.manual_seed(0)
    return gp.build("task_head", "abmil", **{"in_dim": 8, "num_classes": 3, "attn_dim": 5, "dropout": 0.0, **kw}).eval()


def test_registered_as_plugins():
    names = {p["name"] for p in gp.list_plugins("task_head")}
    assert {"abmil", "linear"} <= names


def test_attention_is_ilse_eq9():
    """a_k = exp(w^T(tanh(V h_k) * sigm(U h_k))) / sum_j exp(...), z = sum_k a_k h_k, logits = W z + b, written
    out here from the paper's formula with the module's own parameter tensors."""
    head = _abmil()
    h = torch.randn(2, 7, 8)
    V, U, w = head.pool.V, head.pool.U, head.pool.w
    e = (torch.tanh(h @ V.weight.T + V.bias) * torch.sigmoid(h @ U.weight.T + U.bias)) @ w.weight.T + w.bias
    a = torch.exp(e.squeeze(-1))
    a = a / a.sum(1, keepdim=True)
    z = (a.unsqueeze(-1) * h).sum(1)
    expected = z @ head.classifier.weight.T + head.classifier.bias
    torch.testing.assert_close(head.attention(h), a)
    torch.testing.assert_close(head(h), expected)
    assert head(h).dtype == torch.float32 and head(h).shape == (2, 3)


def test_padding_positions_get_zero_weight_and_change_nothing():
    head = _abmil()
    h = torch.randn(1, 5, 8)
    padded = torch.cat([h, torch.randn(1, 3, 8) * 100], 1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    a = head.attention(padded, mask)
    assert torch.all(a[0, 5:] == 0)
    torch.testing.assert_close(a[0, :5].sum(), torch.tensor(1.0))
    torch.testing.assert_close(head(padded, mask), head(h))


def test_permutation_invariant():
    head = _abmil()
    h = torch.randn(1, 9, 8)
    perm = torch.randperm(9)
    torch.testing.assert_close(head(h[:, perm]), head(h))


@pytest.mark.parametrize("num_classes", [1, 2, 5])
def test_output_shapes(num_classes):
    head = _abmil(num_classes=num_classes, proj_dim=4)
    assert head(torch.randn(3, 6, 8)).shape == (3, num_classes)


def test_shortcut_adds_projected_tile_features():
    head = _abmil(shortcut=True, shortcut_dim=12)
    tokens, feats = torch.randn(1, 4, 8), torch.randn(1, 4, 12)
    with pytest.raises(ValueError, match="tile_features"):
        head(tokens)
    mixed = tokens + feats @ head.shortcut.weight.T + head.shortcut.bias
    torch.testing.assert_close(head(tokens, tile_features=feats), head.classifier(head.pool(mixed)[0]))


def test_linear_head():
    torch.manual_seed(0)
    head = gp.build("task_head", "linear", in_dim=6, num_classes=2).eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(head(None, slide_embed=x), x @ head.classifier.weight.T + head.classifier.bias)
    with pytest.raises(ValueError, match="slide embedding"):
        head(torch.randn(1, 3, 6))


def test_params_are_validated():
    with pytest.raises(ConfigError, match="task_head.params"):
        gp.build("task_head", "abmil", in_dims=8)
    with pytest.raises(ConfigError, match="num_classes"):
        gp.build("task_head", "linear", num_classes=0)
