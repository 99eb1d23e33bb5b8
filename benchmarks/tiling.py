"""Tiling throughput and memory: gigapath's tile path vs a bare OpenSlide ``read_region`` loop (issues #3.6, #16.2).

Slides: the bundled CMU-1-Small-Region (2,220 x 2,967, 0.499 µm/px, 240-px JPEG tiles); a large pyramid built
at run time with pyvips (CMU-1-Small-Region replicated to >= ``--size`` px a side, JPEG Q85, 256-px tiles,
pyramidal, 0.499 µm/px); and a 40x slide (CMU-1-Small-Region upsampled 2x with Lanczos, 0.25 µm/px, single
level, so every 256-px tile at 0.5 µm/px is read as 512 px and resampled). The generated files are written to a
temporary folder and deleted afterwards. For each slide, a fresh child process:

1. opens the slide with the configured readers and runs the Otsu tiler (thumbnail + mask + grid), timed;
2. reads the kept tiles **in the order the embedding stage reads them** (row-major; on a slide with more than
   ``--max-tiles`` kept tiles, the contiguous row-major run of ``--max-tiles`` tiles in the middle) with
   (a) a bare loop ``openslide.OpenSlide.read_region(xy, level, (s, s)).convert("RGB")`` — plus, when the
   tile is read at ``s`` != 256 px (the 40x slide), the same PIL Lanczos resize to 256 px the Otsu tiler
   does by default — and
   (b) the pipeline's path ``TileDataset.read(i)`` (reader plugin -> ``Tiler.read_tile`` -> resample when
   needed), interleaved in blocks of 50 tiles (alternating which loop goes first) so that both see the same
   load on a shared machine. Each pass over the tiles opens fresh handles for both (the open and the first
   reads are timed, as in a DataLoader worker), so neither keeps a warm tile cache from an earlier pass;
   passes repeat to >= 1,000 reads per round. It reports the median tiles/s of each over ``--rounds`` rounds
   (after a warm-up pass: page cache) and their ratio (b / a; target >= 1.5, issue #16.2);
3. reports its peak RSS (``ru_maxrss``); the target is that it does not grow with slide size.

Usage::

    python benchmarks/tiling.py --out benchmarks/results/tiling.json            # full (~5 min on 2 cores)
    python benchmarks/tiling.py --size 12000 --max-tiles 600 --rounds 2        # quick check

``--readers openslide-library,tifffile`` measures OpenSlide's own ``read_region`` in the pipeline (no direct
JPEG decoding). Numbers depend on the machine; compare ratios measured in the same process only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import load_average, machine_info  # noqa: E402
EXAMPLE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"


def build_pyramid(src: Path, out: Path, min_side: int, mpp: float = 0.499) -> dict:
    """Replicate ``src`` to at least ``min_side`` px on each side and save a JPEG tiled pyramidal TIFF."""
    import pyvips

    img = pyvips.Image.new_from_file(str(src)).copy()
    if "image-description" in img.get_fields():
        img.remove("image-description")  # not an Aperio file any more
    nx, ny = math.ceil(min_side / img.width), math.ceil(min_side / img.height)
    big = img.replicate(nx, ny)
    t0 = time.perf_counter()
    big.tiffsave(str(out), tile=True, pyramid=True, compression="jpeg", Q=85, tile_width=256, tile_height=256,
                 bigtiff=True, xres=1000 / mpp, yres=1000 / mpp, resunit="cm")
    return {"width": big.width, "height": big.height, "build_seconds": round(time.perf_counter() - t0, 1),
            "file_mb": round(out.stat().st_size / 2**20, 1)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


BLOCK = 50


def tile_run(n_kept: int, max_tiles: int) -> "np.ndarray":
    """Indices of the tiles timed: all, or the contiguous row-major run of ``max_tiles`` in the middle."""
    import numpy as np

    start = max(0, (n_kept - max_tiles) // 2)
    return np.arange(start, min(n_kept, start + max_tiles))


def child(path: str, readers: list[str], max_tiles: int, rounds: int, min_reads: int = 1000) -> dict:
    """Runs in a fresh process: tiling + the two read loops on one slide; prints a JSON line."""
    import numpy as np
    import openslide
    from PIL import Image

    from gigapath_core.api import build
    from gigapath_core.stages.tile_embedding import TileDataset
    from gigapath_core.stages.tiling import open_slide

    rss_start = _rss_mb()
    tiler = build("tiler", "otsu")
    t0 = time.perf_counter()
    with open_slide(path, readers) as wsi:
        grid = tiler.tile(wsi)
        reader, dims = wsi.reader, wsi.level_dimensions
    tiling_s = time.perf_counter() - t0
    rss_after_mask = _rss_mb()
    coords = grid.coords[tile_run(len(grid.coords), max_tiles)]
    n = len(coords)
    level, size, tile = grid.level, grid.read_size, grid.tile_size

    handles = []  # closed at the end of each pass

    def bare_pass():
        """Times blocks of one pass of the bare loop, on an OpenSlide handle opened in its first block."""
        slide = None

        def run(idx) -> float:
            nonlocal slide
            t = time.perf_counter()
            if slide is None:
                slide = openslide.OpenSlide(path)
                handles.append(slide)
            for i in idx:
                x, y = coords[i]
                img = slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
                if size != tile:  # what the Otsu tiler does by default (resample: lanczos)
                    img = img.resize((tile, tile), Image.Resampling.LANCZOS)
                np.asarray(img)
            return time.perf_counter() - t
        return run

    def ours_pass():
        ds = TileDataset(path, reader, tiler, coords, level, size, tile, transform=lambda t: t)  # opens on read
        handles.append(ds)

        def run(idx) -> float:
            t = time.perf_counter()
            for i in idx:
                ds.read(i)
            return time.perf_counter() - t
        return run

    # one pass = every tile once, in order, fresh handles; passes repeat to >= min_reads reads per round;
    # blocks of BLOCK tiles alternate between the two loops (and which goes first), so both see the same load
    passes = max(1, math.ceil(min_reads / n)) if n else 0
    blocks = [np.arange(n)[i:i + BLOCK] for i in range(0, n, BLOCK)]

    def one_round() -> tuple[float, float]:
        ta = tb = 0.0
        k = 0
        for _ in range(passes):
            bare, ours = bare_pass(), ours_pass()
            for blk in blocks:
                if k % 2:
                    tb += ours(blk)
                    ta += bare(blk)
                else:
                    ta += bare(blk)
                    tb += ours(blk)
                k += 1
            for h in handles:
                h.close()
            handles.clear()
        return ta, tb

    one_round()  # warm-up: page cache, imports, decoder state
    a, b, loads = [], [], []
    for _ in range(rounds):
        loads.append(load_average()[0])
        ta, tb = one_round()
        a.append(passes * n / ta)
        b.append(passes * n / tb)
    ma, mb = statistics.median(a), statistics.median(b)
    return {"slide": Path(path).name, "level_dimensions": dims[:3], "n_levels": len(dims), "reader": reader,
            "tiles_kept": len(grid), "tiles_timed": n, "reads_per_round": passes * n, "level": level,
            "read_size": size, "tile_size": tile, "resample": tiler.p.resample if size != tile else "none",
            "tiling_seconds": round(tiling_s, 3),
            "bare_openslide_tiles_per_s": round(ma, 1), "gigapath_tiles_per_s": round(mb, 1),
            "ratio": round(mb / ma, 3), "rounds_bare": [round(v, 1) for v in a], "rounds_gigapath": [round(v, 1) for v in b],
            "load_avg_1m": loads, "rss_mb_start": round(rss_start, 1), "rss_mb_after_mask": round(rss_after_mask, 1),
            "peak_rss_mb": round(_rss_mb(), 1)}


def run_child(path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(path), "--readers", ",".join(args.readers),
           "--max-tiles", str(args.max_tiles), "--rounds", str(args.rounds)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "GIGAPATH_PROGRESS": "0"})
    if res.returncode != 0:
        raise RuntimeError(f"child failed on {path}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000, help="min side of the generated pyramid, px")
    ap.add_argument("--max-tiles", type=int, default=3000, help="tiles timed per slide (the contiguous "
                    "row-major run in the middle)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating bare/gigapath rounds after a warm-up")
    ap.add_argument("--readers", type=lambda s: s.split(","), default=["openslide", "tifffile", "pyvips"])
    ap.add_argument("--tmp", default=None, help="folder for the generated slides (default: system temp)")
    ap.add_argument("--slides", type=lambda s: s.split(","), default=["cmu", "pyramid", "40x"],
                    help="which of cmu, pyramid, 40x to measure")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.readers, args.max_tiles, args.rounds)))
        return 0

    result = {"benchmark": "tiling", "machine": machine_info(),
              "note": "ratio = gigapath TileDataset.read tiles/s / bare OpenSlide read_region tiles/s (+ the same "
                      "Lanczos resize where the read size is not the tile size), same process, same tiles in the "
                      "stage's row-major order, fresh handles each pass; each slide in a fresh process for its "
                      "peak RSS",
              "params": {"size": args.size, "max_tiles": args.max_tiles, "rounds": args.rounds, "readers": args.readers,
                         "slides": args.slides},
              "slides": []}
    if "cmu" in args.slides:
        result["slides"].append(run_child(EXAMPLE, args))
    tmp = Path(tempfile.mkdtemp(prefix="gigapath-bench-", dir=args.tmp))
    try:
        if "pyramid" in args.slides:
            big = tmp / f"cmu-replicated-{args.size}.tif"
            result["pyramid"] = build_pyramid(EXAMPLE, big, args.size)
            result["slides"].append(run_child(big, args))
        if "40x" in args.slides:
            from resample import build_40x

            path = tmp / "cmu-40x.tif"
            result["slide_40x"] = build_40x(path)
            result["slides"].append(run_child(path, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    by_name = {s["slide"]: s for s in result["slides"]}
    small, large = by_name.get(EXAMPLE.name), by_name.get(f"cmu-replicated-{args.size}.tif")
    result["summary"] = {"ratios": {s["slide"]: s["ratio"] for s in result["slides"]},
                         "min_ratio": min((s["ratio"] for s in result["slides"]), default=None)}
    if small and large:
        result["summary"].update({
            "ratio_real_slide": small["ratio"], "ratio_large_pyramid": large["ratio"],
            "peak_rss_mb_real_slide": small["peak_rss_mb"], "peak_rss_mb_large_pyramid": large["peak_rss_mb"],
            "peak_rss_growth": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "pixels_ratio": round(large["level_dimensions"][0][0] * large["level_dimensions"][0][1]
                                  / (small["level_dimensions"][0][0] * small["level_dimensions"][0][1]), 1)})
    result["machine"]["load_avg_at_end"] = load_average()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
