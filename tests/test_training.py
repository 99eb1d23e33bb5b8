"""Shared trainer: schedule, layer-wise lr decay, EMA, exact resume after an interruption (also with dropout),
random streams keyed to the micro-batch, lazily loaded micro-batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gigapath_core.training import (
    TrainConfig,
    Trainer,
    cosine_schedule,
    ema_update,
    keyed_rng,
    layerwise_param_groups,
    micro_batch_seed,
)


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


def _linear():
    return nn.Linear(3, 1)


def _with_dropout():
    return nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))


@pytest.mark.parametrize("make", [_linear, _with_dropout], ids=["linear", "dropout"])
def test_resume_after_interruption_gives_identical_weights(tmp_path, make):
    """Also with dropout: the resumed run skips the first 6 micro-batches of epoch 1 without running them, yet draws the
    masks the uninterrupted run drew (they are keyed to the micro-batch, not to the process's stream)."""
    torch.manual_seed(0)
    ref = make()
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    Trainer(ref, _cfg(checkpoint_every=3), tmp_path / "a", steps_per_epoch=12).fit(_data, _step)

    calls = {"n": 0}

    def crashing_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 21:  # in epoch 1, after the checkpoint at step 9 (micro-batch 18, mid-epoch)
            raise KeyboardInterrupt
        return _step(model, batch)

    m1 = make()
    m1.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        Trainer(m1, _cfg(checkpoint_every=3), tmp_path / "b", steps_per_epoch=12).fit(_data, crashing_step)
    m2 = make()  # a fresh process would start from a fresh model
    tr = Trainer(m2, _cfg(checkpoint_every=3), tmp_path / "b", steps_per_epoch=12)
    tr.fit(_data, _step)
    assert tr.step == 18
    # the crashed run logged step 10 after its checkpoint at step 9: the resumed run's log has each step once
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 19))
    ref_log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ref_log] == steps
    for k in init:
        torch.testing.assert_close(m2.state_dict()[k], ref.state_dict()[k], rtol=0, atol=0)
    if make is _with_dropout:  # the masks matter: another seed gives other weights from the same start
        other = make()
        other.load_state_dict(init)
        Trainer(other, _cfg(checkpoint_every=3, seed=2), tmp_path / "c", steps_per_epoch=12).fit(_data, _step)
        assert not torch.allclose(other[0].weight, ref[0].weight, atol=1e-4)


def test_keyed_rng_is_a_function_of_the_key_and_restores_the_outer_streams():
    import random

    import numpy as np

    def draws():
        return torch.rand(3).tolist(), np.random.random_sample(3).tolist(), random.random()

    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    with keyed_rng(micro_batch_seed(0, 1, 7)):
        first = draws()
    outer = draws()  # as if no block had run
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert draws() == outer
    with keyed_rng(micro_batch_seed(0, 1, 7)):
        assert draws() == first  # same key, same draws, whatever ran before
    for key in [(0, 1, 8), (0, 2, 7), (1, 1, 7)]:
        with keyed_rng(micro_batch_seed(*key)):
            other = draws()
        assert all(a != b for a, b in zip(other, first))
    assert micro_batch_seed(-1, 0, 0) == micro_batch_seed(2**64 - 1, 0, 0) < 2**64
    with pytest.raises(ValueError):
        micro_batch_seed(0, 0, -1)


def test_lazy_micro_batches_are_loaded_only_when_trained_on(tmp_path):
    """A micro-batch given as a function is called only if the trainer uses it: a resumed run does not load the
    micro-batches its checkpoint had already consumed."""
    loaded: list[tuple[int, int]] = []

    def lazy(epoch):
        for i, batch in enumerate(_data(epoch)):
            yield lambda i=i, batch=batch: loaded.append((epoch, i)) or batch

    torch.manual_seed(0)
    Trainer(nn.Linear(3, 1), _cfg(epochs=1, checkpoint_every=3), tmp_path, steps_per_epoch=12).fit(lazy, _step)
    assert loaded == [(0, i) for i in range(12)]
    loaded.clear()
    (tmp_path / "checkpoints" / "step_00000006").rename(tmp_path / "checkpoints" / "gone")  # back to step 3
    Trainer(nn.Linear(3, 1), _cfg(epochs=1, checkpoint_every=3), tmp_path, steps_per_epoch=12).fit(lazy, _step)
    assert loaded == [(0, i) for i in range(6, 12)]


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
