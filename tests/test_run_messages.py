"""What ``gigapath run`` says on the terminal: each model's random weights once per run (not once as a log
warning, again in the model summary, and again from every pool worker)."""

from __future__ import annotations

import json

from faults_helpers import SLIDE, run_cli

TINY_VIT = {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
            "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}


def test_random_weights_are_said_once_per_model_with_pool_workers(tmp_path):
    cfg = {"inputs": {"slides": [str(SLIDE)]}, "output": str(tmp_path / "out"), "device": "cpu",
           "readers": ["openslide"], "executor": {"name": "local", "params": {"workers": 2}},
           "tile_encoder": {"name": "dinov2_vit", "params": TINY_VIT, "weights": "random", "batch_size": 64,
                            "num_workers": 0}}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    proc = run_cli("run", str(tmp_path / "c.yaml"))
    assert proc.returncode == 0, proc.stderr
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "not pretrained" in line]
    assert said == ["tile encoder: dinov2_vit with RANDOM weights (not pretrained)"]
