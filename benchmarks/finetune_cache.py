"""Frozen slide-encoder cache in ``finetune`` (issue #16.5): the same run with and without the cache.

A synthetic cohort (``--slides`` slides of ``--tiles`` random 64-d tile embeddings, two classes) is fine-tuned
with a frozen, randomly initialised LongNet (``--depth`` layers, ``--dim`` wide; weights saved once and loaded
by every fold) and an ABMIL head, ``--folds`` folds x ``--epochs`` epochs, in one process, cached then uncached
(``encoder_cache_gb: 0``) alternating for ``--rounds`` rounds. Reports wall time, LongNet forward calls, the
speed-up and the largest difference between the two runs' predicted probabilities.

Usage::

    python benchmarks/finetune_cache.py --out benchmarks/results/finetune_cache.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import load_average, write_result  # noqa: E402


def make_cohort(root: Path, slides: int, tiles: int, dim: int = 64) -> None:
    import numpy as np

    from gigapath_core.stages.tile_embedding import write_tile_embeddings

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(tiles)))
    grid = np.stack([np.arange(tiles) % side, np.arange(tiles) // side], 1) * 256
    rows = []
    for s in range(slides):
        feats = rng.normal(size=(tiles, dim)).astype(np.float32)
        feats[:, 0] += 2.0 * (s % 2)
        write_tile_embeddings(root / "emb" / f"S{s:03d}" / "tile_embeddings.h5", feats, grid * 2, grid,
                              {"tile_encoder": "synthetic", "weights_source": "random"})
        rows.append({"slide_id": f"S{s:03d}", "patient_id": f"P{s:03d}", "label": "ab"[s % 2]})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=12)
    ap.add_argument("--tiles", type=int, default=1500)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    import gigapath_core as gp

    logging.getLogger("gigapath").setLevel(logging.ERROR)
    params = {"depth": args.depth, "embed_dim": args.dim, "num_heads": max(1, args.dim // 64)}
    enc = gp.build("slide_encoder", "longnet", weights="random", in_chans=64, **params)
    cls = type(enc)
    calls = [0]
    original = cls.forward

    def counting(self, *a, **k):
        calls[0] += 1
        return original(self, *a, **k)

    cls.forward = counting
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_cohort(root, args.slides, args.tiles)
        torch.save(enc.state_dict(), root / "w.pt")

        def run(name: str, cache_gb: float) -> dict:
            cfg = {"job": "finetune", "encoder_cache_gb": cache_gb,
                   "data": {"embeddings": str(root / "emb"), "labels": str(root / "labels.csv"),
                            "label_columns": "label", "task": "binary"},
                   "folds": {"k": args.folds, "seed": 0},
                   "model": {"slide_encoder": {"name": "longnet", "params": params, "weights": str(root / "w.pt"),
                                               "freeze": True},
                             "head": {"name": "abmil", "params": {"attn_dim": 32, "dropout": 0.0}}},
                   "train": {"epochs": args.epochs, "grad_accum": 2, "device": "cpu", "progress": False},
                   "plots": False, "output": str(root / name)}
            calls[0] = 0
            load = load_average()[0]
            t0 = time.perf_counter()
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                gp.run(cfg)
            seconds = time.perf_counter() - t0
            with open(root / name / "predictions.csv", newline="") as f:
                probs = {(r["fold"], r["slide_id"]): float(r["prob_b"]) for r in csv.DictReader(f)}
            return {"seconds": round(seconds, 2), "encoder_calls": calls[0], "load_avg_1m": load, "probs": probs}

        run("warmup", 4.0)  # imports, allocator and page cache warm before timing
        rounds = []
        for r in range(args.rounds):
            order = [("cached", 4.0), ("uncached", 0.0)]
            if r % 2:
                order.reverse()
            res = {name: run(f"{name}{r}", gb) for name, gb in order}
            rounds.append(res)
            print(f"round {r}: cached {res['cached']['seconds']} s ({res['cached']['encoder_calls']} calls), "
                  f"uncached {res['uncached']['seconds']} s ({res['uncached']['encoder_calls']} calls), "
                  f"load {res['cached']['load_avg_1m']}", flush=True)
    diffs = [max(abs(r["cached"]["probs"][k] - r["uncached"]["probs"][k]) for k in r["cached"]["probs"])
             for r in rounds]
    speedups = [r["uncached"]["seconds"] / r["cached"]["seconds"] for r in rounds]
    for r in rounds:
        for v in r.values():
            del v["probs"]
    result = {"benchmark": "finetune_cache", "config": vars(args) | {"encoder": "longnet", **params},
              "rounds": rounds, "speedup_median": round(statistics.median(speedups), 2),
              "max_abs_prob_diff": float(np.max(diffs))}
    print(f"speed-up (uncached / cached wall time): {result['speedup_median']}x; "
          f"max |prob diff| {result['max_abs_prob_diff']:.2e}")
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
