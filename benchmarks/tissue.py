"""Tissue detection (issue #16.3): the Otsu tiler's mask + grid, and the whole tiling stage with its QC outputs,
vs a bare ``openslide.get_thumbnail`` + HSV saturation + ``skimage.filters.threshold_otsu``.

Per slide, in one process, alternating (which goes first alternates) for ``--rounds`` rounds, each opening the
slide afresh:

Slides: CMU-1-Small-Region and a pyramid of it replicated to ``--size`` px a side (built with pyvips by
``benchmarks/tiling.py``'s ``build_pyramid``, deleted afterwards).

- **bare**: ``OpenSlide(path).get_thumbnail((1024, 1024))`` -> saturation -> ``threshold_otsu`` -> mask;
- **mask + grid**: ``open_slide`` + ``Tiler.tile`` (thumbnail, median blur, Otsu, hole filling, speck removal,
  exact occupancy grid);
- **stage**: ``start_tiling`` as the pipeline runs it: mask + grid + ``tiles.h5`` on the critical path (the time
  until ``tiles.h5`` is written: what the next stage waits for), ``thumbnail.png`` + ``tissue.geojson`` in a
  background thread (the time until they are finished is reported too), and each QC output alone, measured
  separately.

Targets (issue #16): mask + grid <= 1.2x the bare time; QC outputs off the critical path. Usage::

    python benchmarks/tissue.py --out benchmarks/results/tissue.json
    python benchmarks/tissue.py --rounds 3          # a short run: prints the rows, writes nothing
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


def bare(path: str) -> float:
    import openslide
    from skimage.filters import threshold_otsu

    t = time.perf_counter()
    with openslide.OpenSlide(path) as s:
        thumb = np.asarray(s.get_thumbnail((1024, 1024)).convert("RGB"))
    mx = thumb.max(-1).astype(np.float32)
    sat = np.divide(mx - thumb.min(-1), mx, out=np.zeros_like(mx), where=mx > 0)
    _ = sat > threshold_otsu(sat)
    return time.perf_counter() - t


def mask_grid(path: str, tiler) -> float:
    from gigapath_core.stages.tiling import open_slide

    t = time.perf_counter()
    with open_slide(path, ["openslide", "tifffile"]) as wsi:
        tiler.tile(wsi)
    return time.perf_counter() - t


def stage(path: str, tiler, out: Path) -> dict:
    """The tiling stage as the pipeline runs it (``start_tiling``): the time until ``tiles.h5`` is written (what
    the next stage waits for: the critical path) and until the background QC outputs are finished; then each
    QC output alone, synchronously, for the record."""
    import json

    from gigapath_core.stages import tiling as st

    t0 = time.perf_counter()
    with st.open_slide(path, ["openslide", "tifffile"]) as wsi:
        grid, pending = st.start_tiling(tiler, wsi, out, None, {"slide_id": "x"})
        t_tiles = time.perf_counter()
        pending.wait()
        t_qc = time.perf_counter()
        level0 = tuple(wsi.level_dimensions[0])
    t = time.perf_counter()
    png = st.qc_thumbnail(grid, level0)
    st.write_png(out / "thumbnail.png", png, compress_level=1)  # as the QC thread does
    t_png = time.perf_counter()
    st.write_bytes(out / "tissue.geojson", json.dumps(st.tissue_geojson(grid, level0)).encode())
    t_geo = time.perf_counter()
    return {"tiles_h5": t_tiles - t0, "qc_done": t_qc - t0, "png": t_png - t, "geojson": t_geo - t_png}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=20000, help="min side of the generated pyramid (0: none), px")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from gigapath_core.api import build

    tiler = build("tiler", "otsu")
    slides = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(EXAMPLE)]
        if args.size:
            from tiling import build_pyramid

            big = Path(tmp) / f"cmu-replicated-{args.size}.tif"
            build_pyramid(EXAMPLE, big, args.size)
            paths.append(str(big))
        for path in paths:
            bare(path), mask_grid(path, tiler), stage(path, tiler, Path(tmp))  # warm-up
            a, b, parts, loads = [], [], [], []
            for r in range(args.rounds):
                loads.append(load_average()[0])
                if r % 2:
                    b.append(mask_grid(path, tiler))
                    a.append(bare(path))
                else:
                    a.append(bare(path))
                    b.append(mask_grid(path, tiler))
                parts.append(stage(path, tiler, Path(tmp)))
            med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            row = {"slide": Path(path).name, "bare_s": round(statistics.median(a), 4),
                   "mask_grid_s": round(statistics.median(b), 4),
                   "ratio_mask_grid": round(statistics.median(b) / statistics.median(a), 3),
                   "stage_tiles_h5_s": round(med["tiles_h5"], 4),
                   "ratio_stage_tiles_h5": round(med["tiles_h5"] / statistics.median(a), 3),
                   "stage_qc_done_s": round(med["qc_done"], 4),
                   "ratio_stage_qc_done": round(med["qc_done"] / statistics.median(a), 3),
                   "qc_png_s": round(med["png"], 4), "qc_geojson_s": round(med["geojson"], 4),
                   "load_avg_1m": loads}
            slides.append(row)
            print(row, flush=True)
    if args.out:
        write_result(args.out, {"benchmark": "tissue", "slides": slides,
                                "note": "times are medians of alternating rounds; ratios are over the bare time"})


if __name__ == "__main__":
    main()
