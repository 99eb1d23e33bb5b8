"""LongNet slide encoder (12 layers x 768): forward time, FLOP rate and peak RSS vs tile count, against the
official maths (issue #16.4 and #16.6).

Each N runs in its own child process:

- ``build``: RSS after importing the plugin and after building the 12L-768d model (random weights).
- ``fp32`` (one child per N): in ONE process, alternating rounds of the same forward (inference mode, one slide)
  with three attention paths on the same weights: ``fused`` (the default: PyTorch's fused CPU kernel), ``math``
  (the plain-PyTorch kernel: matmul + logsumexp + exp, the official implementation's maths; up to
  ``--math-max`` tiles, it is the bare reference), and ``dense`` (one global attention branch through the fused
  kernel; up to ``--dense-max`` tiles). Per path: seconds of every round, the median, peak RSS of that forward
  alone (the kernel's peak-RSS counter ``VmHWM`` is reset before it), and GFLOP/s. ``flops`` is the exact count
  of the forward's matrix products (``LongNetSlideEncoder.forward_flops``; it equals
  ``torch.utils.flop_counter.FlopCounterMode`` on the ``math`` path, which the tests check). ``matmul_gflops`` is
  this machine's fp32 matmul rate measured in the same process (best of several ``torch.mm`` of the model's
  linear-layer shapes, 4,096 tokens: q/k/v, output projection, FFN in and out, into preallocated outputs),
  before the first and after every round; the compute limit of a forward is ``flops / matmul_gflops`` seconds,
  and ``fraction_of_limit`` = (flops / median seconds) / best matmul rate: 1.0 means the whole forward runs at
  the speed of pure GEMMs. Rounds stop at ``--repeats`` or after the first round that ends past
  ``--round-budget`` seconds.
  ``kernels_alone`` (up to ``--replay-max`` tiles): the fused forward's own GEMMs and fused attention calls, each
  replayed alone on fresh tensors of the same shapes and strides after every round (``kernel_replay.py``);
  ``fraction_of_forward`` = their summed time / the forward's median: how much of the forward is its matrix
  products at the speed PyTorch's kernels reach alone, the rest being element-wise work. ``math_over_kernels_alone``
  is the largest speed-up over the math path that any code doing these products with these kernels could reach.
- ``bf16``: one forward in bf16 (the model cast to bfloat16) per N up to ``--bf16-max``: seconds, peak RSS.
- ``stage``: the pipeline's slide-embedding stage (``run_slide_embedding``: read ``tile_embeddings.h5``,
  encode, write ``slide_embedding.h5``) on ``--stage-n`` tiles (default: the largest size), fp32.
- ``rss_fit``: least-squares line of the fused fp32 forward's peak RSS against N (slope in MiB per 1,000 tiles
  and R^2: linear growth means R^2 close to 1).

Usage::

    python benchmarks/slide_encoder.py [--sizes 1000 3000 10000 30000 70121] [--math-max 10000]
                                       [--dense-max 10000] [--replay-max 70121] [--bf16-max 30000] [--repeats 3]
                                       [--round-budget 60] [--stage-n N] [--only fp32 ...]
                                       [--out benchmarks/results/slide_encoder.json]

Prints one JSON object (and writes it to ``--out``). The tiles are random 1,536-d embeddings on a compact
blob of distinct 256-px cells in row-major order, like a slide's tissue. On a machine shared with other jobs
absolute seconds are noise: compare the same-process ratios and fractions.
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
from kernel_replay import KernelReplay  # noqa: E402
from machine import machine_info, reset_peak_rss  # noqa: E402
MIB = 1024 * 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def hwm_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), MiB; ``ru_maxrss`` where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def matmul_gflops(embed_dim: int = 768, ffn_dim: int = 3072, tokens: int = 4096, repeats: int = 3) -> float:
    """This machine's fp32 matmul rate, GFLOP/s: best of ``repeats`` timings of the model's four linear-layer
    products (q/k/v, output projection, FFN in, FFN out) on ``tokens`` tokens, ``torch.mm`` into preallocated
    outputs (pure GEMM: no bias pass, no fresh memory)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = [(embed_dim, 3 * embed_dim), (embed_dim, embed_dim), (embed_dim, ffn_dim), (ffn_dim, embed_dim)]
    args = [(torch.randn(tokens, i, generator=g), torch.randn(o, i, generator=g).t(), torch.empty(tokens, o))
            for i, o in shapes]
    flops = sum(2 * tokens * i * o for i, o in shapes)
    with torch.inference_mode():
        for x, w, out in args:  # warm-up
            torch.mm(x, w, out=out)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x, w, out in args:
                torch.mm(x, w, out=out)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e9


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
    if kind == "compare":
        return compare(spec)
    if kind == "forward":
        model = build_model()
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
    raise ValueError(kind)


def compare(spec: dict) -> dict:
    """Alternating rounds of the fused, math and dense paths at ``spec["n"]`` tiles in this process (see the
    module doc); returns seconds, GFLOP/s, fraction of the matmul rate and peak RSS per path."""
    import torch

    n, t_start = spec["n"], time.perf_counter()
    model = build_model()
    paths = {"fused": (model, "auto")}
    if n <= spec["math_max"]:
        paths["math"] = (model, "math")
    if n <= spec["dense_max"]:
        dense = build_model(dense_n=n)
        dense.load_state_dict(model.state_dict(), assign=True)  # the same weight tensors: no extra memory
        paths["dense"] = (dense, "auto")
    flops = {name: m.forward_flops(n) for name, (m, _) in paths.items()}
    x, c = slide_inputs(n)
    with torch.inference_mode():
        for m, backend in paths.values():  # warm-up (allocator, oneDNN kernels)
            set_backend(m, backend)
            m(x[:, :64], c[:, :64])
            if m is not model:  # share the stacked q/k/v weight copies too (keyed by the shared tensors)
                for a, b in zip(model.encoder.layers, m.encoder.layers):
                    b.self_attn._qkv_cache = a.self_attn._qkv_cache
        set_backend(model, "auto")
        replay = KernelReplay(model, x, c) if n <= spec.get("replay_max", 0) else None
        rates = [matmul_gflops()]
        rss_before = rss_mib()
        seconds: dict = {name: [] for name in paths}
        peak: dict = {}
        loads = [round(os.getloadavg()[0], 2)]
        for i in range(spec["repeats"]):
            for name, (m, backend) in paths.items():
                set_backend(m, backend)
                reset_peak_rss()
                t0 = time.perf_counter()
                out = m(x, c)
                seconds[name].append(time.perf_counter() - t0)
                peak[name] = max(peak.get(name, 0.0), hwm_mib())
                assert torch.isfinite(out).all()
            rates.append(matmul_gflops())
            if replay is not None:
                set_backend(model, "auto")
                replay.round()
            loads.append(round(os.getloadavg()[0], 2))
            if time.perf_counter() - t_start > spec["round_budget"]:
                break
    rate = max(rates)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    row = {"n": n, "rounds": len(seconds["fused"]), "matmul_gflops": round(rate, 1),
           "matmul_gflops_all": [round(r, 1) for r in rates],
           "flops": flops, "compute_limit_s": round(flops["fused"] / rate / 1e9, 2),
           "seconds": {k: [round(s, 2) for s in v] for k, v in seconds.items()},
           "median_seconds": {k: round(v, 2) for k, v in med.items()},
           "gflops_per_s": {k: round(flops[k] / v / 1e9, 1) for k, v in med.items()},
           "fraction_of_limit": {k: round(flops[k] / v / 1e9 / rate, 3) for k, v in med.items()},
           "rss_before_forward_mib": round(rss_before, 1),
           "peak_rss_mib": {k: round(v, 1) for k, v in peak.items()}, "load_avg_1m": loads}
    for k in ("math", "dense"):
        if k in med:
            row[f"{k}_over_fused"] = round(med[k] / med["fused"], 3)
    if replay is not None:
        alone = replay.summary()
        assert alone["flops"] == flops["fused"], (alone["flops"], flops["fused"])
        row["kernels_alone"] = {**alone, "fraction_of_forward": round(alone["seconds"] / med["fused"], 3),
                                "linear_fraction_of_matmul_rate": round(alone["linear"]["gflops_per_s"] / rate, 3)}
        if "math" in med:
            row["math_over_kernels_alone"] = round(med["math"] / alone["seconds"], 3)
    return row


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


def rss_fit(rows: list[dict], path: str | None = "fused") -> dict:
    """Least-squares line of peak RSS (of ``path`` where rows hold one per path) against N."""
    import numpy as np

    ok = [r for r in rows if "peak_rss_mib" in r]
    if len(ok) < 3:
        return {}
    n = np.array([r["n"] for r in ok], dtype=float)
    rss = np.array([r["peak_rss_mib"][path] if isinstance(r["peak_rss_mib"], dict) else r["peak_rss_mib"]
                    for r in ok])
    slope, intercept = np.polyfit(n, rss, 1)
    pred = slope * n + intercept
    r2 = 1 - ((rss - pred) ** 2).sum() / ((rss - rss.mean()) ** 2).sum()
    return {"mib_per_1000_tiles": round(slope * 1000, 1), "intercept_mib": round(intercept, 1), "r2": round(r2, 4)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 70121])
    parser.add_argument("--math-max", type=int, default=10000,
                        help="largest N of the math (official maths) reference (0: none)")
    parser.add_argument("--dense-max", type=int, default=10000, help="largest N of the dense baseline (0: none)")
    parser.add_argument("--replay-max", type=int, default=70121,
                        help="largest N whose GEMM and attention calls are also replayed alone (0: none)")
    parser.add_argument("--bf16-max", type=int, default=30000, help="largest N measured in bf16 (0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="most alternating rounds per N")
    parser.add_argument("--round-budget", type=float, default=60,
                        help="seconds per N after which no further round starts")
    parser.add_argument("--stage-n", type=int, default=None, help="tiles for the stage run (default: the largest "
                                                                   "size; 0: skip)")
    parser.add_argument("--only", nargs="+", default=None, choices=["build", "fp32", "bf16", "stage"],
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
        "note": "each N is a separate process; fused, math and dense alternate in it. Absolute seconds on a "
                "shared machine are noisy: compare the same-process ratios and fraction_of_limit",
    }
    parts = set(args.only or ["build", "fp32", "bf16", "stage"])
    if "build" in parts:
        result["build"] = run_child({"kind": "build"}, args.timeout)
    if "fp32" in parts:
        result["forward_fp32"] = [run_child({"kind": "compare", "n": n, "math_max": args.math_max,
                                             "dense_max": args.dense_max, "replay_max": args.replay_max,
                                             "repeats": args.repeats,
                                             "round_budget": args.round_budget}, args.timeout)
                                  for n in args.sizes]
        result["rss_fit"] = rss_fit(result["forward_fp32"])
    if "bf16" in parts:
        result["forward_bf16"] = [run_child({"kind": "forward", "n": n, "dtype": "bf16"}, args.timeout)
                                  for n in args.sizes if n <= args.bf16_max]
    stage_n = max(args.sizes) if args.stage_n is None else args.stage_n
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
