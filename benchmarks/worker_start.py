"""Start-up cost of the tile-embedding stage's DataLoader workers per start method (issue #11.1).

The stage forks its reader workers, except for readers that are not fork-safe (pyvips), whose workers a
forkserver starts (:mod:`gigapath_core.stages.worker_start`). This script times, in one process that has
already read the slide (as the tiling stage does), ``--repeats`` DataLoaders of the pipeline's
``TileDataset`` over the same 9 tiles, and reports the time to the first batch and to the last one:

* ``fork``: the stage's method for fork-safe readers (only run with a fork-safe reader: with pyvips it hangs);
* ``forkserver``: a forkserver with the stage's preload (the first DataLoader includes the server's start);
* ``forkserver-bare``: a forkserver without preload (each worker imports torchvision and the plugins);
* ``spawn``.

Usage::

    python benchmarks/worker_start.py --method forkserver --reader pyvips --slide slide.png
    python benchmarks/worker_start.py --method fork --reader openslide --slide examples/data/CMU-1-Small-Region.svs

Each method needs a fresh process (a forkserver's preload is fixed when it starts).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import numpy as np
from torch.utils.data import DataLoader

from gigapath_core.api import build
from gigapath_core.stages.tile_embedding import TileDataset, _collate
from gigapath_core.stages.worker_start import FORKSERVER_PRELOAD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["fork", "forkserver", "forkserver-bare", "spawn"], required=True)
    ap.add_argument("--reader", default="pyvips")
    ap.add_argument("--slide", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    reader = build("slide_reader", args.reader)
    if args.method == "fork" and not getattr(type(reader), "fork_safe", True):
        ap.error(f"reader {args.reader!r} is not fork-safe: forked workers would hang")
    enc = build("tile_encoder", "dinov2_vit", weights="random", model_name="vit_small_patch14_dinov2", img_size=28,
                resize=32, model_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})
    with reader.open(args.slide) as wsi:  # the parent uses the library first, as the tiling stage does
        wsi.read_region((0, 0), 0, (256, 256))
    coords = np.array([[x, y] for y in range(0, 768, 256) for x in range(0, 768, 256)])
    ds = TileDataset(args.slide, args.reader, build("tiler", "otsu"), coords, 0, 256, 256, enc.transform)
    ctx = multiprocessing.get_context(args.method.split("-")[0])
    if args.method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    rows = []
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        batches = iter(DataLoader(ds, batch_size=2, num_workers=args.workers, collate_fn=_collate,
                                  multiprocessing_context=ctx, timeout=300))
        next(batches)
        t1 = time.perf_counter()
        for _ in batches:
            pass
        rows.append({"repeat": rep, "first_batch_s": round(t1 - t0, 3), "all_s": round(time.perf_counter() - t0, 3)})
        print(f"{args.method} {args.reader} workers={args.workers} #{rep}: first batch {rows[-1]['first_batch_s']} s, "
              f"all {rows[-1]['all_s']} s", flush=True)
    print(json.dumps({"method": args.method, "reader": args.reader, "workers": args.workers, "runs": rows}))


if __name__ == "__main__":
    main()
