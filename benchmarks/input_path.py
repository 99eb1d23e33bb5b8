"""Tile input path (issue #16.1): the embedding stage with a cheap encoder vs a bare OpenSlide loop.

On one slide, in one process, alternating round by round (which goes first alternates too) so that both see the
same machine load:

- **stage**: :func:`gigapath_core.stages.tile_embedding.embed_tiles` over a :class:`TileDataset` (reader plugin
  -> Otsu tiler ``read_tile`` -> the encoder's transform -> collation -> encoder), with a cheap encoder: the
  transform is the usual ``ToTensor -> Normalize(ImageNet)`` (:class:`TileTransform`, no resize) and the model
  takes per-channel mean and standard deviation (B, 6) — so reading, transform and collation are the cost;
- **bare**: ``openslide.OpenSlide.read_region(xy, level, (s, s)).convert("RGB")`` then the same normalisation
  and per-channel mean/std in numpy, one tile at a time, single process;
- **bare torch** (a second reference, same compute as the stage): the same reads, the encoder's own transform
  (torchvision ``ToTensor -> Normalize``) per tile, ``torch.stack`` per batch and the same encoder module, on
  one torch thread (the loop a user would write around the model, without a DataLoader).

Variants: the stage with ``num_workers`` 0 and 2 (DataLoader reader workers), each against the bare loops. The
tile coordinates are the tiler's grid on the slide, cycled to ``--reads`` tiles. Ratios are stage tiles/s over
bare tiles/s (the targets of issue #16: >= 0.95 with 0 workers, >= 1.7 with 2 workers on 2 idle cores).

Each pass also records the CPU time it used per tile, in the main process and in its reader workers
(``getrusage``; workers are reaped at the end of the pass): unlike tiles/s this hardly depends on the load, and
``idle_bound`` = bare CPU per tile / max(main CPU, (main + workers CPU) / cores) is the ratio the stage could
reach on idle cores with perfect overlap. The main process keeps torch's thread count unless
``--torch-threads`` sets one (recorded as ``torch_threads``).

Usage::

    python benchmarks/input_path.py --out benchmarks/results/input_path.json
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import load_average, write_result  # noqa: E402

SLIDES = {"cmu1": ROOT / "examples" / "data" / "CMU-1-Small-Region.svs",
          "os2_40x": ROOT / "examples" / "data" / "OS-2-ndpi.ome.tif"}
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class ChannelStats(torch.nn.Module):
    """A cheap tile encoder: (B, 3, h, w) -> (B, 6) per-channel mean and std, ToTensor+Normalize transform."""

    embed_dim = 6
    name = "channel_stats"

    def __init__(self):
        super().__init__()
        from gigapath_plugins.tile_encoders._common import IMAGENET_MEAN, IMAGENET_STD, TileTransform

        self.tile_transform = TileTransform(None, None, IMAGENET_MEAN, IMAGENET_STD)

    def transform(self, tile):
        return self.tile_transform(tile)

    def forward(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", choices=sorted(SLIDES), default="cmu1")
    ap.add_argument("--reads", type=int, default=1200, help="tiles per pass (the grid cycled)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads in the main process")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes kept running beside the measurement "
                                                         "(the 'under a second loaded process' case of issue #16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    import openslide

    from gigapath_core.api import build
    from gigapath_core.stages.tile_embedding import TileDataset, embed_tiles, torch_threads
    from gigapath_core.stages.tiling import open_slide

    path = str(SLIDES[args.slide])
    tiler = build("tiler", "otsu")
    with open_slide(path, ["openslide"]) as wsi:
        grid = tiler.tile(wsi)
        reader = wsi.reader
    coords = np.resize(grid.coords, (max(args.reads, len(grid.coords)), 2))
    level, size, tile = grid.level, grid.read_size, grid.tile_size
    enc = ChannelStats()
    slide = openslide.OpenSlide(path)

    from PIL import Image

    def read(x, y) -> Image.Image:
        img = slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
        return img if size == tile else img.resize((tile, tile), Image.LANCZOS)

    def bare() -> None:
        for x, y in coords:
            a = (np.asarray(read(x, y), dtype=np.float32) / 255 - MEAN) / STD
            np.concatenate([a.mean((0, 1)), a.std((0, 1))])

    @torch.inference_mode()
    def bare_torch() -> None:
        with torch_threads(1):
            for i in range(0, len(coords), args.batch_size):
                enc(torch.stack([enc.tile_transform.compose(read(x, y)) for x, y in coords[i:i + args.batch_size]]))

    def stage(workers: int) -> None:
        ds = TileDataset(path, reader, tiler, coords, level, size, tile, enc.transform)
        embed_tiles(enc, ds, batch_size=args.batch_size, num_workers=workers, device="cpu", precision="fp32")
        ds.close()

    def measure(fn, *a) -> dict:
        """tiles/s, and CPU ms per tile in this process and in the children reaped meanwhile."""
        r0, c0, t = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN), \
            time.perf_counter()
        fn(*a)
        wall = time.perf_counter() - t
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = lambda u0, u1: (u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime) * 1e3 / len(coords)  # noqa: E731
        return {"tiles_per_s": len(coords) / wall, "cpu_ms_main": cpu(r0, r1), "cpu_ms_workers": max(0.0, cpu(c0, c1))}

    import subprocess

    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        variants = _measure_all(args, bare, bare_torch, stage, measure)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    result = {"benchmark": "input_path", "slide": Path(path).name, "reader": reader, "level": level,
              "read_size": size, "tile_size": tile, "reads_per_pass": len(coords), "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "busy_processes": args.busy,
              "encoder": "channel_stats (ToTensor+Normalize transform, per-channel mean/std)", "variants": variants}
    if args.out:
        write_result(args.out, result)


def _measure_all(args, bare, bare_torch, stage, measure) -> list[dict]:
    """Each ``--workers`` variant against both bare loops, ``--rounds`` alternating rounds."""
    cores = len(os.sched_getaffinity(0))
    med = statistics.median
    bare(), bare_torch(), stage(0)  # warm-up
    variants = []
    for w in args.workers:
        runs: dict[str, list[dict]] = {"bare": [], "bare_torch": [], "stage": []}
        loads = []
        for r in range(args.rounds):
            loads.append(load_average()[0])
            order = [("bare", bare, ()), ("bare_torch", bare_torch, ()), ("stage", stage, (w,))]
            for name, fn, a in (order if r % 2 == 0 else order[::-1]):
                runs[name].append(measure(fn, *a))
        rate = {k: med(m["tiles_per_s"] for m in v) for k, v in runs.items()}
        cpu = {k: {c: round(med(m[c] for m in v), 3) for c in ("cpu_ms_main", "cpu_ms_workers")}
               for k, v in runs.items()}
        st = cpu["stage"]
        bound = max(st["cpu_ms_main"], (st["cpu_ms_main"] + st["cpu_ms_workers"]) / min(cores, w + 1))
        variants.append({"num_workers": w, "bare_tiles_per_s": round(rate["bare"], 1),
                         "stage_tiles_per_s": round(rate["stage"], 1), "ratio": round(rate["stage"] / rate["bare"], 3),
                         "bare_torch_tiles_per_s": round(rate["bare_torch"], 1),
                         "ratio_vs_bare_torch": round(rate["stage"] / rate["bare_torch"], 3),
                         "cpu_ms_per_tile": cpu,
                         "idle_bound": round(cpu["bare"]["cpu_ms_main"] / bound, 3),
                         "idle_bound_vs_bare_torch": round(cpu["bare_torch"]["cpu_ms_main"] / bound, 3),
                         **{f"rounds_{k}": [round(m["tiles_per_s"], 1) for m in v] for k, v in runs.items()},
                         "load_avg_1m": loads})
        v = variants[-1]
        print(f"{args.slide} workers={w}: stage {rate['stage']:.0f} tiles/s, bare {rate['bare']:.0f} tiles/s "
              f"(ratio {v['ratio']:.2f}), bare torch {rate['bare_torch']:.0f} tiles/s (ratio "
              f"{v['ratio_vs_bare_torch']:.2f}); CPU ms/tile {cpu}; idle bound {v['idle_bound']:.2f} / "
              f"{v['idle_bound_vs_bare_torch']:.2f} (load {loads})", flush=True)
    return variants


if __name__ == "__main__":
    main()
