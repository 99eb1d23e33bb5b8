"""TransMIL and CLAM-SB/MB task heads: parameter counts against the authors' layer sizes, the Nyström equations,
padding, the CLAM instance-clustering loss and its weighting, and both heads in finetune/ablation by one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import gigapath_core as gp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_plugins import new_heads_registered  # noqa: E402
from test_finetune import config, make_cohort  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="module")
def registered():
    """The new heads through the plugin manager even before the editable plugins package is re-installed
    (their entry points are in plugins/pyproject.toml; test_entry_points_declared checks that)."""
    with new_heads_registered():
        yield


def test_entry_points_declared():
    text = (ROOT / "plugins" / "pyproject.toml").read_text()
    assert 'task_head_transmil = "gigapath_plugins.task_heads.transmil"' in text
    assert 'task_head_clam = "gigapath_plugins.task_heads.clam"' in text


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_reference_layer_sizes():
    # TransMIL (szc19990412/TransMIL models/TransMIL.py, n_classes=2, 1,024-d input):
    #   _fc1 1024*512+512 | cls_token 512 | 2 x TransLayer [LayerNorm 2*512, to_qkv 512*1536 (no bias),
    #   to_out 512*512+512, res_conv 8 heads x 33] | PPEG 512*(49+25+9) + 3*512 | norm 2*512 | _fc2 512*2+2
    layer = 2 * 512 + 512 * 1536 + 512 * 512 + 512 + 8 * 33
    transmil = 1024 * 512 + 512 + 512 + 2 * layer + 512 * (49 + 25 + 9) + 3 * 512 + 2 * 512 + 512 * 2 + 2
    assert transmil == 2_672_146
    assert n_params(gp.build("task_head", "transmil", in_dim=1024, num_classes=2)) == transmil
    # CLAM (mahmoodlab/CLAM models/model_clam.py, size "small" [1024, 512, 256], gated, n_classes=2):
    #   fc 1024*512+512 | attention_a, attention_b 2 x (512*256+256) | attention_c 256*K+K
    #   SB: classifiers 512*2+2; MB: 2 x (512+1) | instance_classifiers 2 x (512*2+2)
    common = 1024 * 512 + 512 + 2 * (512 * 256 + 256) + 2 * (512 * 2 + 2)
    assert n_params(gp.build("task_head", "clam_sb", in_dim=1024, num_classes=2)) == common + 257 + 1026 == 790_791
    assert n_params(gp.build("task_head", "clam_mb", in_dim=1024, num_classes=2)) == common + 514 + 1026 == 791_048
    big = gp.build("task_head", "clam_sb", in_dim=1024, num_classes=2, size="big")
    assert big.attention_net.attention_a[0].out_features == 384  # size "big": [1024, 512, 384]


def test_nystrom_is_exact_softmax_attention_with_one_token_per_landmark():
    """n <= m landmarks: each landmark is one (zero-padded) token, so eq. (15) is softmax(QK^T)V exactly up to
    the iterative pseudo-inverse (Nyströmformer, Xiong et al. 2021), which converges with more iterations."""
    from gigapath_plugins.task_heads.nystrom import NystromAttention, iterative_pinv

    torch.manual_seed(0)
    att = NystromAttention(16, heads=2, dim_head=8, num_landmarks=8, pinv_iterations=30, residual_kernel=None).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        got = att(x)
        xp = F.pad(x, (0, 0, 3, 0))  # zero tokens in front up to m = 8
        q, k, v = (t.reshape(1, 8, 2, 8).transpose(1, 2) for t in att.to_qkv(xp).chunk(3, -1))
        ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
        ref = att.to_out(ref.transpose(1, 2).reshape(1, 8, 16))[:, -5:]
    assert torch.allclose(got, ref, atol=1e-5)
    att.pinv_iterations = 6  # TransMIL's setting: an approximation, close but not exact
    with torch.no_grad():
        assert torch.allclose(att(x), ref, atol=1e-2) and not torch.allclose(att(x), ref, atol=1e-5)
    a = torch.softmax(4 * torch.eye(6) + 0.3 * torch.randn(3, 6, 6), -1)  # well-conditioned, like the landmark kernel
    assert torch.allclose(iterative_pinv(a, 12), torch.linalg.pinv(a), atol=1e-4)


def test_transmil_forward_padding_and_tiny_bags():
    torch.manual_seed(0)
    head = gp.build("task_head", "transmil", in_dim=8, num_classes=3, dim=32, heads=4).eval()
    a, b = torch.randn(1, 10, 8), torch.randn(1, 3, 8)
    batch = torch.cat([a, F.pad(b, (0, 0, 0, 7))])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[1, 3:] = True
    with torch.no_grad():
        out = head(batch, mask)
        assert out.shape == (2, 3) and out.dtype == torch.float32
        assert torch.allclose(out[0], head(a)[0], atol=1e-5) and torch.allclose(out[1], head(b)[0], atol=1e-5)
        assert head(torch.randn(1, 1, 8)).shape == (1, 3)  # one tile: a 1 x 1 grid


def test_clam_instance_loss_and_training_objective():
    torch.manual_seed(0)
    head = gp.build("task_head", "clam_sb", in_dim=8, num_classes=3, k_sample=2, dropout=0.0)
    head.train()
    x = torch.randn(1, 6, 8)
    logits = head(x)
    assert logits.shape == (1, 3)
    target = torch.tensor([1])
    attn, h = head._last[0]  # (1, 6) softmaxed attention, (6, 512) hidden tiles
    top, bottom = torch.topk(attn[0], 2).indices, torch.topk(-attn[0], 2).indices
    want = F.cross_entropy(head.instance_classifiers[1](torch.cat([h[top], h[bottom]])), torch.tensor([1, 1, 0, 0]))
    assert torch.allclose(head.instance_loss(target), want)
    task = F.cross_entropy(logits, target)
    assert torch.allclose(head.training_loss(task, target), 0.7 * task + 0.3 * want)
    head.subtyping = True  # every other class's top tiles are negatives for its classifier; mean over classes
    extra = sum(F.cross_entropy(head.instance_classifiers[c](h[top]), torch.zeros(2, dtype=torch.long)) for c in (0, 2))
    assert torch.allclose(head.instance_loss(target), (want + extra) / 3)
    head.eval()
    assert head.training_loss(task, target) is task  # evaluation: the task loss alone


def test_clam_mb_binary_gives_log_odds():
    torch.manual_seed(0)
    head = gp.build("task_head", "clam_mb", in_dim=8, num_classes=1, dropout=0.0).eval()
    x = torch.randn(1, 7, 8)
    with torch.no_grad():
        logit = head(x)
        h = head.fc(x[0])
        attn = torch.softmax(head.attention_net(h).T, 1)
        m = attn @ h
        per_class = torch.stack([head.classifiers[c](m[c])[0] for c in (0, 1)])
    assert logit.shape == (1, 1) and torch.allclose(logit[0, 0], per_class[1] - per_class[0])
    head.train()
    head(x)
    assert head.instance_loss(torch.tensor([[1.0]])) > 0  # binary targets are (B, 1) floats


def test_heads_run_in_ablation_by_one_line(tmp_path):
    """ABMIL, TransMIL, CLAM-SB and CLAM-MB as variants of one ablation on shared folds (one line each)."""
    make_cohort(tmp_path, n_patients=12, shift=4.0)
    base = config(tmp_path)
    base["folds"] = {"k": 3, "seed": 0}
    base["train"].update(epochs=2, grad_accum=1)
    del base["output"]
    cfg = {"job": "ablation", "base": base, "output": str(tmp_path / "abl"), "reference": "abmil",
           "metrics": ["auroc"],
           "variants": {"abmil": {},
                        "transmil": {"model.head": {"name": "transmil", "params": {"dim": 32, "heads": 4}}},
                        "clam_sb": {"model.head": {"name": "clam_sb", "params": {"k_sample": 2}}},
                        "clam_mb": {"model.head": {"name": "clam_mb", "params": {"k_sample": 2}}}}}
    assert gp.run(cfg) == 0
    result = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert set(result["variants"]) == {"abmil", "transmil", "clam_sb", "clam_mb"}
    for v in ("transmil", "clam_sb", "clam_mb"):
        assert len(result["variants"][v]["auroc"]["folds"]) == 3
        status = json.loads((tmp_path / "abl" / v / "fold_0" / "status.json").read_text())
        assert status["models"]["head"] == v
