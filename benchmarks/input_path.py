"""Tile input path (issue #16.1): the embedding stage with a cheap encoder vs a bare OpenSlide loop.

On one slide, in one process, alternating round by round (which goes first alternates too) so that both see the
same machine load:

- **stage**: :func:`gigapath_core.stages.tile_embedding.embed_tiles` over a :class:`TileDataset` (reader plugin
  -> Otsu tiler ``read_tile`` -> the encoder's transform -> collation -> encoder), with a cheap encoder: the
  transform is the usual ``ToTensor -> Normalize(ImageNet)`` (:class:`TileTransform`, no resize) and the model
  takes per-channel mean and standard deviation (B, 6) — so reading, transform and collation are the cost;
- **bare**: ``openslide.OpenSlide.read_region(xy, level, (s, s)).convert("RGB")`` then the same normalisation
  and per-channel mean/std in numpy, one tile at a time, single process.

Variants: the stage with ``num_workers`` 0 and 2 (DataLoader reader workers), each against the bare loop. The
tile coordinates are the tiler's grid on the slide, cycled to ``--reads`` tiles. Ratios are stage tiles/s over
bare tiles/s (the targets of issue #16: >= 0.95 with 0 workers, >= 1.7 with 2 workers on 2 idle cores).

Usage::

    python benchmarks/input_path.py --out benchmarks/results/input_path.json
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--reads", type=int, default=600, help="tiles per pass (the grid cycled)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import openslide

    from gigapath_core.api import build
    from gigapath_core.stages.tile_embedding import TileDataset, embed_tiles
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

    def bare() -> float:
        t = time.perf_counter()
        for x, y in coords:
            img = slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
            if size != tile:
                from PIL import Image

                img = img.resize((tile, tile), Image.LANCZOS)
            a = (np.asarray(img, dtype=np.float32) / 255 - MEAN) / STD
            np.concatenate([a.mean((0, 1)), a.std((0, 1))])
        return len(coords) / (time.perf_counter() - t)

    def stage(workers: int) -> float:
        ds = TileDataset(path, reader, tiler, coords, level, size, tile, enc.transform)
        t = time.perf_counter()
        embed_tiles(enc, ds, batch_size=args.batch_size, num_workers=workers, device="cpu", precision="fp32")
        rate = len(coords) / (time.perf_counter() - t)
        ds.close()
        return rate

    bare(), stage(0)  # warm-up
    variants = []
    for w in args.workers:
        a, b, loads = [], [], []
        for r in range(args.rounds):
            loads.append(load_average()[0])
            if r % 2:
                b.append(stage(w))
                a.append(bare())
            else:
                a.append(bare())
                b.append(stage(w))
        ratio = statistics.median(b) / statistics.median(a)
        variants.append({"num_workers": w, "bare_tiles_per_s": round(statistics.median(a), 1),
                         "stage_tiles_per_s": round(statistics.median(b), 1), "ratio": round(ratio, 3),
                         "rounds_bare": [round(v, 1) for v in a], "rounds_stage": [round(v, 1) for v in b],
                         "load_avg_1m": loads})
        print(f"{args.slide} workers={w}: stage {statistics.median(b):.0f} tiles/s, bare "
              f"{statistics.median(a):.0f} tiles/s, ratio {ratio:.2f} (load {loads})", flush=True)
    result = {"benchmark": "input_path", "slide": Path(path).name, "reader": reader, "level": level,
              "read_size": size, "tile_size": tile, "reads_per_pass": len(coords), "batch_size": args.batch_size,
              "encoder": "channel_stats (ToTensor+Normalize transform, per-channel mean/std)", "variants": variants}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
