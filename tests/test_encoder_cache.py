"""Frozen slide-encoder outputs are computed once per slide per run (issue #16.5) and change no result."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gigapath_core as gp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune import config, make_cohort  # noqa: E402

LONGNET = {"depth": 2, "embed_dim": 16, "num_heads": 2}


@pytest.fixture
def longnet_calls(monkeypatch):
    """Records the tile count of every LongNet forward call."""
    if "longnet" not in {p["name"] for p in gp.list_plugins("slide_encoder")}:
        pytest.skip("the longnet slide encoder plugin is not installed")
    cls = type(gp.build("slide_encoder", "longnet", weights="random", in_chans=8, **LONGNET))
    calls: list[int] = []
    original = cls.forward

    def counting(self, tile_embeds, *args, **kwargs):
        calls.append(int(tile_embeds.shape[1]))
        return original(self, tile_embeds, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    return calls


def _weights_file(root: Path) -> str:
    torch.manual_seed(3)
    enc = gp.build("slide_encoder", "longnet", weights="random", in_chans=8, **LONGNET)
    path = root / "longnet.pt"
    torch.save(enc.state_dict(), path)
    return str(path)


def _cfg(root: Path, out: str, weights: str, **over) -> dict:
    se = {"name": "longnet", "params": LONGNET, "weights": weights, "freeze": True}
    return config(root, **{"model.slide_encoder": se, "folds.k": 2, "train.epochs": 2, "output": str(root / out),
                           **over})


def _probs(path: Path) -> dict[tuple[str, str], float]:
    with open(path, newline="") as f:
        return {(r["slide_id"], r["split"]): float(r["prob_pos"]) for r in csv.DictReader(f)}


def _n_tiles(root: Path) -> dict[str, int]:
    import h5py

    return {p.parent.name: len(h5py.File(p, "r")["features"]) for p in (root / "emb").glob("*/tile_embeddings.h5")}


def test_frozen_encoder_runs_once_per_slide_and_matches_the_uncached_run(tmp_path, longnet_calls):
    make_cohort(tmp_path, n_patients=6)  # 12 slides of 4-12 tiles
    n_tiles = _n_tiles(tmp_path)
    weights = _weights_file(tmp_path)
    assert gp.run(_cfg(tmp_path, "cached", weights)) == 0
    # the pre-flight's check forward (random weights, before anything is written), then: every slide is trained
    # on in one fold and tested in the other, over 2 epochs: one encoder call each
    assert len(longnet_calls) == 1 + 12 and sorted(longnet_calls[1:]) == sorted(n_tiles.values())
    longnet_calls.clear()
    assert gp.run(_cfg(tmp_path, "uncached", weights, encoder_cache_gb=0)) == 0
    # the pre-flight's check forward; per fold: the check forward, 2 epochs of its 6 training slides, 6 test slides
    assert len(longnet_calls) == 1 + 2 * (1 + 2 * 6 + 6)
    cached, uncached = _probs(tmp_path / "cached" / "predictions.csv"), _probs(tmp_path / "uncached" /
                                                                              "predictions.csv")
    assert cached.keys() == uncached.keys() and len(cached) == 12
    np.testing.assert_allclose([cached[k] for k in sorted(cached)], [uncached[k] for k in sorted(cached)],
                               rtol=0, atol=1e-6)


def test_random_encoder_is_cached_per_fold_and_tile_subsets_are_not_cached(tmp_path, longnet_calls):
    make_cohort(tmp_path, n_patients=6)  # every slide has over 3 tiles
    assert gp.run(_cfg(tmp_path, "out", "random", **{"data.max_tiles": 3})) == 0
    # training steps see fresh 3-tile subsets: never cached (2 folds x 2 epochs x 6 training slides)
    assert longnet_calls.count(3) == 24
    # whole slides per fold: the check forward and 6 test slides (plus the pre-flight's one check). The random
    # encoder is re-drawn per fold, so fold 2 cannot reuse fold 1's outputs (with the weights left out of the key
    # it would make 5 calls, not 7)
    assert len(longnet_calls) - 24 == 1 + 2 * 7


def test_ablation_variants_share_the_frozen_encoder(tmp_path, longnet_calls):
    make_cohort(tmp_path, n_patients=6)
    make_cohort(tmp_path / "n", n_patients=6, noise_only=True, seed=5)  # same slide ids, other features
    (tmp_path / "n" / "emb").rename(tmp_path / "noise")
    base = _cfg(tmp_path, "unused", _weights_file(tmp_path))
    del base["output"]
    cfg = {"job": "ablation", "base": base, "output": str(tmp_path / "abl"), "metrics": ["auroc"],
           "variants": {"abmil": {}, "linear": {"model.head": {"name": "linear"}},
                        "noise": {"data.embeddings": str(tmp_path / "noise")}}}
    assert gp.run(cfg) == 0
    # every variant's pre-flight check first (3 calls, random weights); then abmil and linear read the same
    # features through the same encoder: 12 calls; noise has its own 12
    assert len(longnet_calls) == 3 + 2 * 12
    assert sorted(longnet_calls[3:15]) == sorted(_n_tiles(tmp_path).values())
