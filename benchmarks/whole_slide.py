"""One whole slide through the real pipeline, stage by stage, each against a bare reference in the same process
(issue #16.6).

Per slide, in a fresh child process, an untimed warm-up (the pipeline and the bare references once on
CMU-1-Small-Region, so that neither side pays the process's first calls; their seconds are kept as
``warmup_seconds``, what the first slide of a run costs), then ``--rounds`` rounds (which goes first
alternates), each into a new output folder so that nothing is skipped:

- **gigapath**: ``gigapath_core.api.run`` on the quick start's configuration (``examples/quickstart.yaml``: Otsu
  tiler, ``dinov2-vits14`` ViT-S/14 tile encoder and the ``prov-gigapath`` LongNet slide encoder, 12 layers x
  768, both with random weights; ``device: auto``). Seconds per stage are the pipeline's own (the manifest's
  ``seconds_tiling``, ``seconds_tile_encoder``, ``seconds_slide_encoder``); ``startup`` is the config check and
  the model build, ``outputs`` the rest of the run (manifest, ``status.json``, ``report.html``). Peak RSS per
  stage is the process's high-water mark, reset when the stage starts (``/proc/self/clear_refs``, Linux), read
  when it ends; it includes what the process already held when the stage started (``rss_start_mib``: the
  imports, and from ``tiling`` on the models). The same for each bare reference (``bare_peak_rss_mib``,
  ``bare_rss_start_mib``; the pipeline's models are freed before the bare references run). Reader worker
  processes (``num_workers: auto`` starts none on the CPU) are not in these figures: ``largest_child_rss_mib``
  is the peak RSS of the largest child process reaped so far.
- **bare**, per stage: ``tiling``: ``OpenSlide.get_thumbnail`` + saturation + ``threshold_otsu``
  (``benchmarks/tissue.py``'s bare); ``tile embedding``: an ``openslide.read_region`` loop over the same tiles
  (``tiles.h5``), the published torchvision transform per tile (Resize 256 bicubic, CenterCrop 224, ToTensor,
  Normalize ImageNet), batches of the same size, a bare ``timm.create_model("vit_small_patch14_dinov2")``
  forward; ``slide embedding``: the same LongNet module's forward on the same tile embeddings and grid px,
  with no file read or written. Models are built before their bare timing starts.

``ratio`` is gigapath seconds / bare seconds (below 1: faster than the bare reference). Slides: ``cmu1`` (the
bundled CMU-1-Small-Region.svs, 49 tiles) and ``pyramid`` (CMU-1-Small-Region replicated to ``--pyramid-side``
px a side, a JPEG tiled pyramidal TIFF built with ``benchmarks/tiling.py``'s ``build_pyramid`` and deleted
afterwards: 11,100 x 11,868 px at the default 10,000, 22,200 x 20,769 px at 20,000).

Wall time on this project's 2-core machine is about twice the ViT-S/14 time of the slide's tiles (the pipeline
and the bare loop each embed every tile once per round), plus ~15 s of warm-up: CMU-1 took 29 s at load 1.4
(3.5 min at load 5); a 4,000-px pyramid (199 tiles) 2.6 min at load 4.5; 10,000 px is ~1,000 tiles (~2-3 min
idle), 20,000 px ~3,400 tiles (~6 min idle at ~20 tiles/s). On CUDA the tile encoder runs in bf16 and these
take seconds.

Usage::

    python benchmarks/whole_slide.py --out benchmarks/results/whole_slide.json              # cmu1
    python benchmarks/whole_slide.py --slides cmu1 pyramid --out benchmarks/results/whole_slide.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import load_average, reset_peak_rss, write_result  # noqa: E402

EXAMPLE = ROOT / "examples" / "data" / "CMU-1-Small-Region.svs"
TILE_ENCODER = {"name": "dinov2-vits14", "weights": "random", "batch_size": 16}  # as examples/quickstart.yaml
SLIDE_ENCODER = {"name": "prov-gigapath", "weights": "random"}
TIMM_MODEL = "vit_small_patch14_dinov2"  # what the dinov2-vits14 preset builds (registry.yaml)
STAGES = ("startup", "tiling", "tile embedding", "slide embedding", "outputs")
BARE = {"tiling": "thumbnail + saturation + threshold_otsu",
        "tile embedding": "read_region loop + torchvision transform + timm forward",
        "slide embedding": "LongNet forward on the same inputs"}


# ------------------------------------------------------------------ memory
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return round(_status_kib("VmRSS") / 1024, 1)


def peak_rss_mib() -> float:
    """High-water mark since the last :func:`reset_peak_rss` (else since the process started)."""
    kib = _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024, 1)


class Meter:
    """Seconds and peak RSS of named spans in this process."""

    def __init__(self):
        self.spans: dict[str, dict] = {}
        self._ends: list[float] = []  # peak RSS at the end of every span so far (a nested span resets the mark)

    def measure(self, name: str, fn, *args, **kwargs):
        start = rss_mib()
        reset_peak_rss()
        first = len(self._ends)
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            span = self.spans.setdefault(name, {"seconds": 0.0, "peak_rss_mib": 0.0, "rss_start_mib": start})
            span["seconds"] += time.perf_counter() - t
            peak = max([peak_rss_mib(), *self._ends[first:]])
            span["peak_rss_mib"] = max(span["peak_rss_mib"], peak)
            self._ends.append(peak)

    def wrap(self, module, attr: str, name: str) -> None:
        fn = getattr(module, attr)

        def wrapped(*args, **kwargs):
            return self.measure(name, fn, *args, **kwargs)

        setattr(module, attr, wrapped)


# ------------------------------------------------------------------ one slide, in a child process
def run_pipeline(path: str, out: Path) -> dict:
    """The quick-start pipeline on ``path`` through ``gigapath_core.api.run``, with stage hooks."""
    import gigapath_core as gp
    from gigapath_core import jobs, pipeline

    meter = Meter()
    pipeline._MODELS.clear()  # every round builds its models
    originals = {(m, a): getattr(m, a) for m, a in ((pipeline, "get_models"), (pipeline, "start_tiling"),
                                                    (pipeline, "embed_tiles"), (pipeline, "run_slide_embedding"))}
    meter.wrap(pipeline, "get_models", "startup")
    meter.wrap(pipeline, "start_tiling", "tiling")  # QC outputs are written in the background after it
    meter.wrap(pipeline, "embed_tiles", "tile embedding")
    meter.wrap(pipeline, "run_slide_embedding", "slide embedding")
    cfg = {"inputs": {"slides": [path]}, "readers": ["openslide", "tifffile"], "device": "auto",
           "tiler": {"name": "otsu"}, "tile_encoder": dict(TILE_ENCODER), "slide_encoder": dict(SLIDE_ENCODER)}
    try:
        t = time.perf_counter()
        code = meter.measure("run", gp.run, cfg, out=str(out))
        total = time.perf_counter() - t
    finally:
        for (m, a), fn in originals.items():
            setattr(m, a, fn)
    pipeline._MODELS.clear()  # the bare references start without the pipeline's models
    gc.collect()
    if code != 0:
        raise RuntimeError(f"gigapath run exited {code}; see {out}/manifest.csv")
    import csv

    with open(out / "manifest.csv") as f:
        row = next(csv.DictReader(f))
    sp = meter.spans
    seconds = {"startup": sp["startup"]["seconds"], "tiling": float(row["seconds_tiling"]),
               "tile embedding": float(row["seconds_tile_encoder"]),
               "slide embedding": float(row["seconds_slide_encoder"])}
    seconds["outputs"] = total - sum(seconds.values())
    peaks = {k: sp[k]["peak_rss_mib"] for k in ("startup", "tiling", "tile embedding", "slide embedding")}
    starts = {k: sp[k]["rss_start_mib"] for k in peaks}
    return {"seconds": seconds, "peak_rss_mib": peaks, "rss_start_mib": starts, "run_seconds": total,
            "run_peak_rss_mib": sp["run"]["peak_rss_mib"], "n_tiles": int(row["n_tiles"]),
            "reader": row["reader"],
            "largest_child_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def bare_references(path: str, out: Path) -> dict:
    """The bare reference of each stage, on the tiles and tile embeddings the pipeline wrote in ``out``."""
    import h5py
    import numpy as np
    import openslide
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms as T

    import gigapath_core as gp
    from gigapath_core.pipeline import resolve_device
    from tissue import bare as bare_tissue

    meter = Meter()
    meter.measure("tiling", bare_tissue, path)
    slide_dir = next(p for p in out.iterdir() if (p / "tiles.h5").is_file())
    with h5py.File(slide_dir / "tiles.h5") as f:
        coords = f["coords"][:]
        level, size, tile = (int(f.attrs[k]) for k in ("level", "read_size", "tile_size"))
    with h5py.File(slide_dir / "tile_embeddings.h5") as f:
        feats, grid = f["features"][:], f["grid_coords"][:]
    device = resolve_device("auto")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))
    torch.manual_seed(0)
    model = timm.create_model(TIMM_MODEL, pretrained=False, img_size=224, num_classes=0).to(device).eval()
    transform = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                           T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bs = TILE_ENCODER["batch_size"]

    @torch.inference_mode()
    def embed_tiles():
        slide, outs, batch = openslide.OpenSlide(path), [], []
        for k, (x, y) in enumerate(coords):
            img = slide.read_region((int(x), int(y)), level, (size, size)).convert("RGB")
            if size != tile:
                img = img.resize((tile, tile), Image.LANCZOS)
            batch.append(transform(img))
            if len(batch) == bs or k == len(coords) - 1:
                with autocast:
                    outs.append(model(torch.stack(batch).to(device)).float().cpu())
                batch = []
        slide.close()
        return torch.cat(outs)

    meter.measure("tile embedding", embed_tiles)
    del model
    slide_encoder = gp.build("slide_encoder", SLIDE_ENCODER["name"], weights="random",
                             in_chans=feats.shape[1]).to(device).eval()

    @torch.inference_mode()
    def encode():
        x = torch.from_numpy(feats)[None].to(device)
        c = torch.from_numpy(grid.astype(np.float64))[None].to(device)
        with autocast:
            return slide_encoder(x, c)

    meter.measure("slide embedding", encode)
    del slide_encoder
    gc.collect()
    return {"seconds": {k: v["seconds"] for k, v in meter.spans.items()},
            "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in meter.spans.items()},
            "rss_start_mib": {k: v["rss_start_mib"] for k, v in meter.spans.items()}}


def child(path: str, rounds: int, work: Path, warmup: bool = True) -> dict:
    """Runs in a fresh process: ``rounds`` alternating rounds of the pipeline and the bare references, after
    an untimed warm-up (the pipeline and the bare references once on CMU-1-Small-Region) so that neither side
    pays the first calls of the process (imports, first forward passes: ~1 s of LongNet's)."""
    import openslide

    cold = None
    if warmup:
        cold = run_pipeline(str(EXAMPLE), work / "warmup")
        bare_references(str(EXAMPLE), work / "warmup")
    pipes, bares, loads = [], [], []
    for r in range(rounds):
        out = work / f"round{r}"
        loads.append(load_average()[0])
        if r % 2 == 0:
            pipes.append(run_pipeline(path, out))
            bares.append(bare_references(path, out))
        else:  # bare first, on the tiles and embeddings of round 0
            bares.append(bare_references(path, work / "round0"))
            pipes.append(run_pipeline(path, out))
    with openslide.OpenSlide(path) as s:
        dims = list(s.dimensions)
    med = statistics.median
    stages = []
    for name in STAGES:
        row = {"stage": name, "seconds": round(med(p["seconds"][name] for p in pipes), 3),
               "rounds_seconds": [round(p["seconds"][name], 3) for p in pipes]}
        if name in pipes[0]["peak_rss_mib"]:
            row["peak_rss_mib"] = max(p["peak_rss_mib"][name] for p in pipes)
            row["rss_start_mib"] = pipes[0]["rss_start_mib"][name]
        if name in BARE:
            row.update(bare=BARE[name], bare_seconds=round(med(b["seconds"][name] for b in bares), 3),
                       bare_rounds_seconds=[round(b["seconds"][name], 3) for b in bares],
                       bare_peak_rss_mib=max(b["peak_rss_mib"][name] for b in bares),
                       bare_rss_start_mib=bares[0]["rss_start_mib"][name])
            row["ratio"] = round(row["seconds"] / row["bare_seconds"], 3)
        stages.append(row)
    return {"slide": Path(path).name, "dimensions": dims, "n_tiles": pipes[0]["n_tiles"],
            "reader": pipes[0]["reader"], "rounds": rounds, "stages": stages,
            "run_seconds": round(med(p["run_seconds"] for p in pipes), 3),
            "run_peak_rss_mib": max(p["run_peak_rss_mib"] for p in pipes),
            "largest_child_rss_mib": max(p["largest_child_rss_mib"] for p in pipes), "load_avg_1m": loads,
            "warmup_seconds": {k: round(v, 3) for k, v in cold["seconds"].items()} if cold else None}


# ------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="+", choices=["cmu1", "pyramid"], default=["cmu1"])
    ap.add_argument("--pyramid-side", type=int, default=10000, help="min px a side of the generated slide")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true",
                    help="time the first pipeline run of the process (cold) instead of warming up on CMU-1 first")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds, Path(args.work), not args.no_warmup)), flush=True)
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="gigapath-whole-slide-") as tmp:
        tmp = Path(tmp)
        for name in args.slides:
            info = {}
            if name == "cmu1":
                path = EXAMPLE
            else:
                from tiling import build_pyramid

                path = tmp / f"pyramid-{args.pyramid_side}.tif"
                info = build_pyramid(EXAMPLE, path, args.pyramid_side)
            work = tmp / f"work-{name}"
            work.mkdir()
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(path), "--work", str(work),
                                   "--rounds", str(args.rounds)] + ["--no-warmup"] * args.no_warmup,
                                  capture_output=True, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                sys.exit(f"{name}: child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            res.update(name=name, child_wall_seconds=round(time.perf_counter() - t, 1), **info)
            results.append(res)
            print(f"{name}: {res['n_tiles']} tiles, run {res['run_seconds']:.1f} s "
                  f"(child process {res['child_wall_seconds']} s)")
            for s in res["stages"]:
                bare = f"  bare {s['bare_seconds']:.2f} s  ratio {s['ratio']:.2f}" if "bare" in s else ""
                peak = f"  peak {s['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in s else ""
                print(f"  {s['stage']:16s} {s['seconds']:7.2f} s{peak}{bare}", flush=True)
            if name != "cmu1":
                path.unlink()
    result = {"benchmark": "whole_slide", "tile_encoder": TILE_ENCODER, "slide_encoder": SLIDE_ENCODER,
              "bare_tile_model": TIMM_MODEL, "slides": results}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
