"""LongNet slide encoder (12 layers x 768): forward time and peak RSS vs tile count, dense-attention baseline.

Each measurement runs in its own child process, so peak RSS (``ru_maxrss``) belongs to that measurement only:

- ``build``: RSS after importing the plugin and after building the 12L-768d model (random weights).
- ``forward``: one forward pass (inference mode, after a 64-tile warm-up) for N tiles in fp32, and in bf16
  (the model cast to bfloat16) up to ``--bf16-max`` tiles: seconds, peak RSS, and RSS before the forward.
- ``dense``: the same model with one dense attention branch (segment = whole sequence, ratio 1), i.e. plain
  global attention through the same fused kernel, up to ``--dense-max`` tiles.
- ``ratio``: in ONE process at ``--ratio-n`` tiles, interleaved runs of dilated attention (fused kernel),
  dense attention, and dilated attention with the plain-PyTorch ``math`` kernel (the reference's plain
  softmax): medians and ratios. On a machine shared with other jobs these ratios are the numbers to compare;
  absolute seconds are noisy.
- ``stage``: the pipeline's slide-embedding stage (``run_slide_embedding``: read ``tile_embeddings.h5``,
  encode, write ``slide_embedding.h5``) on ``--stage-n`` tiles (default: the largest size), fp32.
- ``rss_fit``: least-squares line of peak RSS against N over the fp32 forwards (slope in MiB per 1,000 tiles and
  R^2: linear growth means R^2 close to 1).

Usage::

    python benchmarks/slide_encoder.py [--sizes 1000 3000 10000 30000 70121] [--bf16-max 30000]
                                       [--dense-max 10000] [--ratio-n 3000] [--repeats 2] [--stage-n N]
                                       [--out result.json]

Prints one JSON object (and writes it to ``--out``). The tiles are random 1,536-d embeddings on a compact
blob of distinct 256-px cells in row-major order, like a slide's tissue.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import machine_info  # noqa: E402
MIB = 1024 * 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def slide_inputs(n: int, seed: int = 0):
    """(1, n, 1536) float32 random tile embeddings, (1, n, 2) grid px of n distinct cells in a blob."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * 1.3)))
    cells = np.sort(rng.choice(side * side, size=n, replace=False))  # row-major: by row (y), then column (x)
    coords = np.stack([cells % side, cells // side], 1) * 256
    feats = rng.standard_normal((n, 1536), dtype=np.float32)
    return torch.from_numpy(feats)[None], torch.from_numpy(coords.astype(np.float32))[None]


def build_model(dense_n: int | None = None, backend: str = "auto"):
    import torch

    from gigapath_plugins.slide_encoders.longnet import LongNetSlideEncoder

    torch.manual_seed(0)
    kw = {"segment_lengths": [dense_n + 1], "dilated_ratios": [1]} if dense_n else {}
    return LongNetSlideEncoder(attention_backend=backend, **kw).eval()


def set_backend(model, backend: str) -> None:
    for layer in model.encoder.layers:
        layer.self_attn.backend = backend


def child(spec: dict) -> dict:
    """One measurement (run in a fresh process)."""
    import torch

    torch.set_grad_enabled(False)
    kind = spec["kind"]
    if kind == "build":
        import gigapath_plugins.slide_encoders.longnet  # noqa: F401

        after_import = rss_mib()
        t0 = time.perf_counter()
        model = build_model()
        return {"rss_after_import_mib": round(after_import, 1), "rss_after_build_mib": round(rss_mib(), 1),
                "peak_rss_mib": round(peak_rss_mib(), 1), "seconds": round(time.perf_counter() - t0, 2),
                "params": sum(p.numel() for p in model.parameters())}
    n = spec["n"]
    if kind in ("forward", "dense"):
        model = build_model(dense_n=n if kind == "dense" else None)
        dtype = torch.bfloat16 if spec.get("dtype") == "bf16" else torch.float32
        model = model.to(dtype)
        x, c = slide_inputs(n)
        x = x.to(dtype)
        with torch.inference_mode():
            model(x[:, :64], c[:, :64])
            before = rss_mib()
            t0 = time.perf_counter()
            out = model(x, c)
            seconds = time.perf_counter() - t0
        assert torch.isfinite(out.float()).all()
        return {"n": n, "dtype": spec.get("dtype", "fp32"), "seconds": round(seconds, 2),
                "rss_before_forward_mib": round(before, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}
    if kind == "stage":
        import tempfile

        import numpy as np

        from gigapath_core.stages.slide_embedding import SLIDE_FILE, run_slide_embedding
        from gigapath_core.stages.tile_embedding import write_tile_embeddings
        from gigapath_core.store import read_h5

        model = build_model()
        x, c = slide_inputs(n)
        with tempfile.TemporaryDirectory() as tmp:
            coords = c[0].numpy().astype(np.int64)
            write_tile_embeddings(Path(tmp) / "tile_embeddings.h5", x[0].numpy(), coords, coords, {})
            del x, c
            before = rss_mib()
            t0 = time.perf_counter()
            run_slide_embedding(model, Path(tmp), "tile_embeddings.h5", {}, device=torch.device("cpu"),
                                precision="fp32")
            seconds = time.perf_counter() - t0
            emb = read_h5(Path(tmp) / SLIDE_FILE)[0]["embedding"]
        assert emb.shape == (768,) and np.isfinite(emb).all()
        return {"n": n, "seconds": round(seconds, 2), "rss_before_stage_mib": round(before, 1),
                "peak_rss_mib": round(peak_rss_mib(), 1)}
    if kind == "ratio":
        model = build_model()
        dense = build_model(dense_n=n)
        dense.load_state_dict(model.state_dict())
        x, c = slide_inputs(n)
        runs = {"dilated_fused": [], "dense_fused": [], "dilated_math": []}
        with torch.inference_mode():
            model(x[:, :64], c[:, :64])
            for _ in range(spec["repeats"]):
                for name in runs:
                    m = dense if name == "dense_fused" else model
                    set_backend(m, "math" if name == "dilated_math" else "auto")
                    t0 = time.perf_counter()
                    m(x, c)
                    runs[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in runs.items()}
        return {"n": n, "seconds": {k: [round(s, 2) for s in v] for k, v in runs.items()},
                "median_seconds": {k: round(v, 2) for k, v in med.items()},
                "dense_over_dilated": round(med["dense_fused"] / med["dilated_fused"], 3),
                "math_kernel_over_fused": round(med["dilated_math"] / med["dilated_fused"], 3)}
    raise ValueError(kind)


def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {spec} -> {out} ({time.perf_counter() - t0:.0f} s wall)", file=sys.stderr, flush=True)
    return out


def rss_fit(rows: list[dict]) -> dict:
    import numpy as np

    ok = [r for r in rows if "peak_rss_mib" in r]
    if len(ok) < 3:
        return {}
    n = np.array([r["n"] for r in ok], dtype=float)
    rss = np.array([r["peak_rss_mib"] for r in ok])
    slope, intercept = np.polyfit(n, rss, 1)
    pred = slope * n + intercept
    r2 = 1 - ((rss - pred) ** 2).sum() / ((rss - rss.mean()) ** 2).sum()
    return {"mib_per_1000_tiles": round(slope * 1000, 1), "intercept_mib": round(intercept, 1), "r2": round(r2, 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 70121])
    parser.add_argument("--bf16-max", type=int, default=30000, help="largest N measured in bf16 (0: none)")
    parser.add_argument("--dense-max", type=int, default=10000, help="largest N of the dense baseline (0: none)")
    parser.add_argument("--ratio-n", type=int, default=3000, help="N of the same-process ratio (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of the ratio runs")
    parser.add_argument("--stage-n", type=int, default=None, help="tiles for the stage run (default: largest "
                                                                   "size; 0: skip)")
    parser.add_argument("--only", nargs="+", default=None, choices=["build", "ratio", "fp32", "bf16", "dense", "stage"],
                        help="run only these parts")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return {}
    import torch

    result: dict = {
        "benchmark": "slide_encoder", "model": "longnet 12L-768d (gigapath_slide_enc12l768d), random weights",
        "machine": {**machine_info(),
                    "loadavg_at_start": os.getloadavg(),
                    "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "")},
        "note": "each row is a separate process; absolute seconds on a shared machine are noisy, compare ratios",
    }
    parts = set(args.only or ["build", "ratio", "fp32", "bf16", "dense", "stage"])
    stage_n = max(args.sizes) if args.stage_n is None else args.stage_n
    if "build" in parts:
        result["build"] = run_child({"kind": "build"}, args.timeout)
    if "ratio" in parts and args.ratio_n:
        result["ratio"] = run_child({"kind": "ratio", "n": args.ratio_n, "repeats": args.repeats}, args.timeout)
    if "fp32" in parts:
        result["forward_fp32"] = [run_child({"kind": "forward", "n": n}, args.timeout) for n in args.sizes]
        result["rss_fit"] = rss_fit(result["forward_fp32"])
    if "bf16" in parts:
        result["forward_bf16"] = [run_child({"kind": "forward", "n": n, "dtype": "bf16"}, args.timeout)
                                  for n in args.sizes if n <= args.bf16_max]
    if "dense" in parts:
        result["dense_fp32"] = [run_child({"kind": "dense", "n": n}, args.timeout)
                                for n in args.sizes if n <= args.dense_max]
    if "stage" in parts and stage_n:
        result["stage"] = run_child({"kind": "stage", "n": stage_n}, args.timeout)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
