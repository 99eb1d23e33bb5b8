"""Reading a 40x slide (issue #16.2): Lanczos vs area resampling of 512-px reads to 256-px tiles.

A 0.25-µm/px slide without a 0.5-µm/px level (CMU-1-Small-Region upsampled 2x with pyvips, saved as a
single-level JPEG tiled TIFF at 0.25 µm/px in a temporary folder) is tiled by the Otsu tiler (read_size 512).
In one process, in alternating blocks of 50 tiles, reading the kept tiles in the stage's (row-major) order
with fresh handles each pass (no decoded tiles carried over between passes), it times tiles/s of

- **bare**: ``openslide.read_region(xy, 0, (512, 512)).convert("RGB")`` + PIL Lanczos resize to 256 (what the
  tile reader did before), and
- **lanczos** / **area**: ``TileDataset.read`` with the Otsu tiler's ``resample: lanczos`` (default) and
  ``resample: area`` (``Image.reduce(2)``, the mean of 2 x 2 blocks),

then measures what ``area`` changes: pixel difference and the difference of ``dinov2-vits14`` tile embeddings
(random seeded weights: a check of scale, not of a pretrained model) — max-abs and min cosine similarity.

Usage::

    python benchmarks/resample.py --out benchmarks/results/resample.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import load_average, write_result  # noqa: E402

EXAMPLE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"
BLOCK = 50


def build_40x(out: Path) -> dict:
    import pyvips

    img = pyvips.Image.new_from_file(str(EXAMPLE)).copy()
    if "image-description" in img.get_fields():
        img.remove("image-description")
    big = img.resize(2.0, kernel="lanczos3")[:3] if img.bands == 4 else img.resize(2.0, kernel="lanczos3")
    big.tiffsave(str(out), tile=True, pyramid=False, compression="jpeg", Q=85, tile_width=256, tile_height=256,
                 xres=1000 / 0.25, yres=1000 / 0.25, resunit="cm")
    return {"width": big.width, "height": big.height, "mpp": 0.25}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--embed-tiles", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import openslide
    import torch
    from PIL import Image

    from gigapath_core.api import build
    from gigapath_core.stages.tile_embedding import TileDataset, embed_tiles
    from gigapath_core.stages.tiling import open_slide

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cmu-40x.tif"
        slide_info = build_40x(path)
        tilers = {m: build("tiler", "otsu", resample=m) for m in ("lanczos", "area")}
        with open_slide(str(path), ["openslide"]) as wsi:
            grid = tilers["lanczos"].tile(wsi)
            reader = wsi.reader
        level, size, tile = grid.level, grid.read_size, grid.tile_size
        coords = grid.coords  # read in the stage's (row-major) order, each pass on fresh handles
        passes = max(1, -(-args.reads // len(coords)))
        handles = {}

        def fresh() -> None:
            """New handles for every loop (no decoded-tile cache carried over from an earlier pass)."""
            for h in handles.values():
                h.close()
            handles["bare"] = openslide.OpenSlide(str(path))
            for m, t in tilers.items():
                handles[m] = TileDataset(str(path), reader, t, coords, level, size, tile, lambda x: x)

        def bare(idx) -> float:
            t = time.perf_counter()
            slide = handles["bare"]
            for i in idx:
                x, y = coords[i]
                img = slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
                np.asarray(img.resize((tile, tile), Image.Resampling.LANCZOS))
            return time.perf_counter() - t

        def ours(mode):
            def run(idx) -> float:
                t = time.perf_counter()
                for i in idx:
                    handles[mode].read(i)
                return time.perf_counter() - t
            return run

        loops = {"bare": bare, "lanczos": ours("lanczos"), "area": ours("area")}
        blocks = [np.arange(len(coords))[i:i + BLOCK] for i in range(0, len(coords), BLOCK)]
        fresh()
        for f in loops.values():
            f(blocks[0])  # warm-up
        rates = {k: [] for k in loops}
        loads = []
        for r in range(args.rounds):
            loads.append(load_average()[0])
            total = dict.fromkeys(loops, 0.0)
            k = 0
            for _ in range(passes):
                fresh()
                for blk in blocks:
                    names = list(loops)
                    names = names[k % 3:] + names[:k % 3]  # rotate who goes first
                    for name in names:
                        total[name] += loops[name](blk)
                    k += 1
            for name in loops:
                rates[name].append(passes * len(coords) / total[name])
        for h in handles.values():
            h.close()
        med = {k: statistics.median(v) for k, v in rates.items()}

        # what area changes
        n = min(args.embed_tiles, len(grid.coords))
        ds = {m: TileDataset(str(path), reader, t, coords, level, size, tile, lambda x: x) for m, t in tilers.items()}
        pix = {m: np.stack([ds[m].read(i) for i in range(n)]).astype(np.float32) for m in ds}
        torch.manual_seed(0)
        enc = build("tile_encoder", "dinov2-vits14", weights="random")
        emb = {}
        for m, t in tilers.items():
            d = TileDataset(str(path), reader, t, grid.coords[:n], level, size, tile, enc.transform)
            emb[m] = embed_tiles(enc, d, batch_size=16, num_workers=0, device="cpu", precision="fp32")
        a, b = emb["lanczos"], emb["area"]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    result = {"benchmark": "resample", "slide": slide_info, "level": level, "read_size": size, "tile_size": tile,
              "reads_per_round": passes * len(coords), "tiles_per_s": {k: round(v, 1) for k, v in med.items()},
              "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
              "ratio_area_vs_bare": round(med["area"] / med["bare"], 3),
              "ratio_lanczos_vs_bare": round(med["lanczos"] / med["bare"], 3),
              "pixel_mean_abs_diff": round(float(np.abs(pix["area"] - pix["lanczos"]).mean()), 3),
              "pixel_max_abs_diff": float(np.abs(pix["area"] - pix["lanczos"]).max()),
              "embedding": {"encoder": "dinov2-vits14 (random seeded weights)", "tiles": n,
                            "max_abs_diff": float(np.abs(a - b).max()), "max_abs_value": float(np.abs(a).max()),
                            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())},
              "load_avg_1m": loads}
    print(result, flush=True)
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
