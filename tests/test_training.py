"""Shared trainer: schedule, layer-wise lr decay, EMA, exact resume after an interruption."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gigapath_core.training import TrainConfig, Trainer, cosine_schedule, ema_update, layerwise_param_groups


def _data(epoch: int, n: int = 12):
    g = torch.Generator().manual_seed(100 + epoch)
    w = torch.tensor([[2.0, -1.0, 0.5]])
    for _ in range(n):
        x = torch.randn(4, 3, generator=g)
        yield x, x @ w.T + 0.3


def _step(model, batch):
    x, y = batch
    return {"loss": nn.functional.mse_loss(model(x), y)}


def _cfg(**kw):
    base = dict(lr=0.2, weight_decay=0.0, epochs=3, grad_accum=2, warmup_steps=2, seed=1, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def test_loss_goes_down(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    hist = Trainer(model, _cfg(), tmp_path, steps_per_epoch=12).fit(_data, _step)
    assert len(hist) == 18  # 3 epochs x 12 micro-batches / accumulation 2
    assert hist[-1]["loss"] < 0.2 * hist[0]["loss"]


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    torch.manual_seed(0)
    ref = nn.Linear(3, 1)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    Trainer(ref, _cfg(checkpoint_every=3), tmp_path / "a", steps_per_epoch=12).fit(_data, _step)

    calls = {"n": 0}

    def crashing_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 17:  # in epoch 1, after the checkpoint at step 6 (micro-batch 12)
            raise KeyboardInterrupt
        return _step(model, batch)

    m1 = nn.Linear(3, 1)
    m1.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        Trainer(m1, _cfg(checkpoint_every=3), tmp_path / "b", steps_per_epoch=12).fit(_data, crashing_step)
    m2 = nn.Linear(3, 1)  # a fresh process would start from a fresh model
    tr = Trainer(m2, _cfg(checkpoint_every=3), tmp_path / "b", steps_per_epoch=12)
    tr.fit(_data, _step)
    assert tr.step == 18
    for k in init:
        torch.testing.assert_close(m2.state_dict()[k], ref.state_dict()[k], rtol=0, atol=0)


def test_warmup_cosine_closed_form():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # step s >= warm-up: 0.5 * (1 + cos(pi * (s - 4) / 10))
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_layerwise_lr_decay_scales():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    groups = layerwise_param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.9,
                                    layer_id=lambda n: int(n.split(".")[0]), num_layers=2)
    by_scale = {round(g["lr_scale"], 6): g for g in groups if g["weight_decay"] > 0}
    assert set(by_scale) == {round(0.9**2, 6), 0.9, 1.0}  # layer 0 gets 0.81, top layer 1.0
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim == 1 for p in g["params"]))


def test_ema_update_formula():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = 0.9 * a.weight.detach().clone() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight.detach(), expected)
