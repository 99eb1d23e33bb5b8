"""benchmarks/kernel_replay.py records every matrix product of a LongNet forward (issue #16.4: the compute
limit, shown): the recorded FLOPs must equal the model's exact count, which tests/test_longnet_attention.py checks
against torch's FlopCounterMode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from gigapath_plugins.slide_encoders.longnet import LongNetSlideEncoder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def replay_mod():
    spec = importlib.util.spec_from_file_location("kernel_replay", ROOT / "benchmarks" / "kernel_replay.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_replay", mod)
    spec.loader.exec_module(mod)
    return mod


def _model_and_inputs(n: int, backend: str = "auto"):
    torch.manual_seed(0)
    model = LongNetSlideEncoder(in_chans=32, embed_dim=64, depth=2, num_heads=4, segment_lengths=[16, 40],
                                dilated_ratios=[1, 2], attention_backend=backend).eval()
    x = torch.randn(1, n, 32)
    cells = torch.arange(n)
    coords = torch.stack([cells % 9, cells // 9], 1)[None].float() * 256
    return model, x, coords


@pytest.mark.parametrize("n", [37, 80])
def test_recorded_products_are_every_flop_of_the_forward(replay_mod, n):
    model, x, coords = _model_and_inputs(n)
    calls = replay_mod.record(model, x, coords)
    linear = sum(c for (f, _, _), c in calls.items() if f is torch.ops.aten.linear.default)
    attention = sum(c for (f, _, _), c in calls.items() if f is not torch.ops.aten.linear.default)
    assert linear == 1 + 2 * 4  # tile projection; per layer q/k/v (one GEMM), output projection, fc1, fc2
    # per layer: branch (16, 1) cuts 1 + n tokens into full segments (one call) and a tail; branch (40, 2) too
    segs = [(1 + n) // 16 > 0, (1 + n) % 16 > 0, (1 + n) // 40 > 0, (1 + n) % 40 > 0]
    assert attention == 2 * sum(segs)
    total = sum(replay_mod.call_flops(f, sig) * c for (f, sig, _), c in calls.items())
    assert total == model.forward_flops(n)


def test_replay_times_each_call_and_sums_the_forward_flops(replay_mod):
    model, x, coords = _model_and_inputs(50)
    replay = replay_mod.KernelReplay(model, x, coords)
    replay.round(repeats=1)
    replay.round(repeats=1)
    s = replay.summary()
    assert s["flops"] == model.forward_flops(50)
    assert s["rounds"] == 2 and s["distinct_calls"] == len(replay.calls)
    assert s["linear"]["seconds"] > 0 and s["attention"]["seconds"] > 0
    assert s["seconds"] == pytest.approx(s["linear"]["seconds"] + s["attention"]["seconds"], abs=2e-6)


def test_math_backend_has_no_fused_calls_to_replay(replay_mod):
    model, x, coords = _model_and_inputs(50, backend="math")
    calls = replay_mod.record(model, x, coords)
    assert {f for f, _, _ in calls} == {torch.ops.aten.linear.default}
