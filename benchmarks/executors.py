"""Executor throughput: slides/hour of the ``embed`` job on the bundled slide replicated N times (default 20),
with the ``local`` executor (in-process, and a 2-process pool) and the ``ray`` executor (local cluster bound to
127.0.0.1), and Ray's overhead per slide (issue #8 item 6).

Every variant runs in this process on a fresh output folder with the same config and the same slides
(symlinks to ``examples/data/CMU-1-Small-Region.svs``), in the order local, ray, pool, local again (the two
local runs bracket the others so drift of a shared machine shows). For each variant:

* ``startup_s``: executor creation + models built where slides run (Ray: cluster start + first actor);
* ``map_s``: the slides themselves; ``slides_per_hour = N / map_s * 3600`` and ``..._incl_startup``;
* ``busy_s``: the sum of the slides' own ``seconds_total`` (time inside ``process_slide``).

Ray's overhead per slide is measured two ways, both against the in-process local executor, with Ray running
one actor that holds all cores (``num_cpus`` = cores), i.e. the same work with the same parallelism:

* ``dispatch_s_per_slide`` = ``(map_s - busy_s) / N`` for the one-slide-at-a-time variants: the time per
  slide spent outside ``process_slide`` (dispatch, result transfer, bookkeeping); insensitive to load drift
  because both terms come from the same run. ``ray_overhead_per_slide_s`` is Ray's minus local's.
* ``ray_1_actor_vs_local_map_ratio`` = ``map_s[ray-1] / map_s[local]`` (mean of the two local runs), which
  also includes any difference in the slides' own speed (and the drift of a shared machine).

Usage::

    python benchmarks/executors.py --out benchmarks/results/executors.json            # tiny ViT (overhead)
    python benchmarks/executors.py --model vits14 --n 20                              # ViT-S/14 tile encoder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray cluster on loopback only
os.environ.setdefault("GIGAPATH_PROGRESS", "0")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"

MODELS = {
    # a 1-block ViT at 28 px: slide time is tiling + I/O, so executor overhead shows
    "tiny": {"name": "dinov2_vit", "weights": "random",
             "params": {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
                        "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}},
    # the quick start's ViT-S/14 (random weights), 224 px
    "vits14": {"name": "dinov2-vits14", "weights": "random"},
}


def make_config(slides_dir: Path, out: Path, model: str) -> dict:
    te = {**MODELS[model], "batch_size": 32, "num_workers": 0}
    dim = 48 if model == "tiny" else 384
    return {"inputs": {"slides": [str(slides_dir / "*.svs")]}, "output": str(out), "device": "cpu",
            "readers": ["openslide"], "tile_encoder": te,
            "slide_encoder": {"name": "mean", "params": {"in_dim": dim}, "weights": "random"}}


def run_variant(label: str, raw: dict, executor: str, params: dict) -> dict:
    from gigapath_core.config import load_pipeline_config
    from gigapath_core.executors import get_executor, map_until_done
    from gigapath_core.pipeline import _MODELS, process_slide

    _MODELS.clear()  # every variant builds its models
    cfg, slides = load_pipeline_config({**raw, "executor": {"name": executor, "params": params}}, ROOT)
    t0 = time.perf_counter()
    ex = get_executor(executor, **params)
    try:
        ex.describe_models(cfg)
        t1 = time.perf_counter()
        rows = list(map_until_done(ex, process_slide, cfg, slides))
        t2 = time.perf_counter()
    finally:
        ex.close()
    t3 = time.perf_counter()
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise SystemExit(f"{label}: {len(bad)} slides not ok: {bad[0]}")
    n = len(rows)
    return {"variant": label, "executor": executor, "params": params, "slides": n,
            "startup_s": round(t1 - t0, 2), "map_s": round(t2 - t1, 2), "close_s": round(t3 - t2, 2),
            "busy_s": round(sum(float(r["seconds_total"]) for r in rows), 2),
            "slides_per_hour": round(n / (t2 - t1) * 3600),
            "slides_per_hour_incl_startup": round(n / (t2 - t0) * 3600)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="copies of the bundled slide")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray variants")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix=".bench-exec-", suffix=".tmp", dir=ROOT))
    results = []
    try:
        slides = work / "slides"
        slides.mkdir()
        for i in range(args.n):
            (slides / f"copy{i:03d}.svs").symlink_to(EXAMPLE)
        variants = [("local", "local", {})]
        if not args.no_ray:
            variants += [("ray-1-actor", "ray", {"num_workers": 1, "num_cpus": cores,
                                                 "init": {"num_cpus": cores, "_temp_dir": str(work / "ray")}}),
                         ("ray-2-actors", "ray", {"num_workers": 2, "num_cpus": max(1, cores // 2),
                                                  "init": {"num_cpus": cores, "_temp_dir": str(work / "ray")}})]
        variants += [("local-pool-2", "local", {"workers": 2}), ("local-again", "local", {})]
        for label, name, params in variants:
            out = work / f"out-{label}"
            results.append(run_variant(label, make_config(slides, out, args.model), name, params))
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    by = {r["variant"]: r for r in results}
    local_map = (by["local"]["map_s"] + by["local-again"]["map_s"]) / 2
    summary = {"local_map_s_mean": round(local_map, 2),
               "local_drift_ratio": round(by["local-again"]["map_s"] / by["local"]["map_s"], 3)}
    for r in results:  # only where one slide runs at a time (busy_s of parallel workers overlaps)
        sequential = r["variant"] in ("local", "local-again", "ray-1-actor")
        r["dispatch_s_per_slide"] = round((r["map_s"] - r["busy_s"]) / r["slides"], 4) if sequential else None
    local_dispatch = (by["local"]["dispatch_s_per_slide"] + by["local-again"]["dispatch_s_per_slide"]) / 2
    summary["local_dispatch_s_per_slide"] = round(local_dispatch, 4)
    if "ray-1-actor" in by:
        summary.update({
            "ray_dispatch_s_per_slide": by["ray-1-actor"]["dispatch_s_per_slide"],
            "ray_overhead_per_slide_s": round(by["ray-1-actor"]["dispatch_s_per_slide"] - local_dispatch, 4),
            "ray_1_actor_vs_local_map_ratio": round(by["ray-1-actor"]["map_s"] / local_map, 3),
            "ray_2_actors_vs_local_map_ratio": round(by["ray-2-actors"]["map_s"] / local_map, 3),
            "ray_startup_s": by["ray-1-actor"]["startup_s"]})
    summary["pool_2_vs_local_map_ratio"] = round(by["local-pool-2"]["map_s"] / local_map, 3)
    import torch

    report = {"benchmark": "executors", "model": args.model, "slides": args.n,
              "slide": EXAMPLE.name, "machine": {"cpus": cores, "platform": platform.platform(),
                                                 "python": platform.python_version(), "torch": torch.__version__,
                                                 "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
              "results": results, "summary": summary}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
