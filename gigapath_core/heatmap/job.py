"""``gigapath heatmap``: for every finished slide of an embed run, score the tiles with a trained model and
write the pictures, the QuPath GeoJSON and the raw scores.

Output (``OUT_HEATMAP``, default ``<embed run>/heatmaps``)::

    OUT_HEATMAP/heatmaps.json                   the run: embed folder, model, options, one entry per slide
    OUT_HEATMAP/report.html                     every slide's heatmap, prediction and files on one page
    OUT_HEATMAP/<slide_id>/scores.h5, scores.csv    raw per-tile scores (see export.write_scores)
    OUT_HEATMAP/<slide_id>/heatmap_attention.png    attention over the slide (fine-tuned attention heads)
    OUT_HEATMAP/<slide_id>/heatmap_<class>.png      tile class score (or zero-shot similarity) per class
    OUT_HEATMAP/<slide_id>/montage_<name>.png       top-k and bottom-k tiles by the same values
    OUT_HEATMAP/<slide_id>/tiles.geojson            one QuPath detection per tile with measurements
    OUT_HEATMAP/<slide_id>/status.json              {"status": "ok"|"failed", "reason", "files"}

A slide that cannot be scored or read fails alone (status.json with the reason); the others go on.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, GigapathError
from ..report import try_write_run_report
from ..store import read_status, write_bytes, write_json, write_status
from .export import measurements, write_scores
from .montage import draw_montage, read_tiles, top_bottom
from .qupath import tile_features_geojson
from .render import attention_scale, draw_heatmap, paint_overlay, score_scale, tissue_rings
from .slide_data import EMBEDDINGS_FILE, read_slide_tiles

log = logging.getLogger("gigapath")
INDEX_FILE = "heatmaps.json"
DEFAULT_READERS = ["openslide", "tifffile"]


def safe_name(name: str) -> str:
    """A class name as a file-name part: letters, digits, ``-`` and ``_`` kept, the rest ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "class"


def embed_slides(embed_dir: Path, only: Sequence[str] | None = None) -> list[str]:
    """Slide ids of an embed run that finished (status ok) and have tile embeddings, sorted."""
    ids = []
    for p in sorted(embed_dir.glob(f"*/{EMBEDDINGS_FILE}")):
        s = read_status(p.parent)
        if s and s.get("status") == "ok":
            ids.append(p.parent.name)
    if only:
        missing = sorted(set(only) - set(ids))
        if missing:
            raise ConfigError("--slides", f"no finished slide {missing[0]!r} with tile embeddings in {embed_dir}")
        ids = [i for i in ids if i in set(only)]
    return ids


def run_heatmaps(embed_dir: str | Path, out: str | Path | None = None, *, model: str | Path | None = None,
                 folds: str | int = "all", clip: str | Path | None = None,
                 classes: dict[str, list[str]] | None = None, size: int = 2048, top_k: int = 8,
                 smooth: float = 0.0, scale: str = "percentile", slides: Sequence[str] | None = None,
                 montages: bool = True) -> dict[str, Any]:
    """Score, draw and export every finished slide of ``embed_dir``. Returns the heatmaps.json content.

    Args:
        model: a finetune output folder (attention head); or ``clip`` + ``classes`` for zero-shot.
        folds: ``"all"`` (mean over the fold models) or one fold index.
        size: long side of the heatmap image in px.
        top_k: tiles per montage row (0 = no montages).
        smooth: Gaussian smoothing of the heatmap in tile sides (0 = each tile one flat cell).
        scale: attention colour scale, ``percentile`` or ``ratio``.
    Raises:
        ConfigError: neither or both of model/clip, a folder that is not what it should be, no slide to draw.
    """
    from ..progress import console, make_progress

    embed_dir = Path(embed_dir).resolve()
    if not embed_dir.is_dir():
        raise ConfigError("EMBED_DIR", f"not a folder: {embed_dir}")
    if (model is None) == (clip is None):
        raise ConfigError("--model", "give exactly one of --model (finetune output) or --clip (clip output)")
    if scale not in ("percentile", "ratio"):
        raise ConfigError("--scale", f"unknown attention scale {scale!r} (percentile or ratio)")
    out = Path(out).resolve() if out else embed_dir / "heatmaps"
    ids = embed_slides(embed_dir, slides)
    if not ids:
        raise ConfigError("EMBED_DIR", f"{embed_dir} has no finished slide with {EMBEDDINGS_FILE}")
    first = read_slide_tiles(embed_dir / ids[0])
    if model is not None:
        from .scores import load_finetune_models

        scorer = load_finetune_models(model, first.features.shape[1], folds)
        names = ", ".join(f"fold_{f.fold}" for f in scorer.folds)  # as the folders and --fold name them
        console.print(f"heatmaps: {len(scorer.folds)} fold model(s) of {Path(model).resolve()} ({names}"
                      f"{', mean over folds' if len(scorer.folds) > 1 else ''})")
        _check_trained_grid(Path(model), embed_dir, first.tile_size, first.target_mpp)
    else:
        from .scores import load_zeroshot_scorer

        scorer = load_zeroshot_scorer(clip, classes or {})
    weights = _weights_note(embed_dir / ids[0])
    index: dict[str, Any] = {"embeddings": str(embed_dir), "model": str(Path(model or clip).resolve()),
                             "kind": "finetune" if model is not None else "zeroshot", "folds": folds,
                             "size": size, "top_k": top_k, "smooth": smooth, "scale": scale, "slides": {}}
    failed = 0
    with make_progress() as progress:
        task = progress.add_task("heatmaps", total=len(ids))
        for sid in ids:
            try:
                files = heatmap_slide(embed_dir / sid, out / sid, scorer, size=size, top_k=top_k if montages else 0,
                                      smooth=smooth, scale=scale, note=weights)
                entry = {"status": "ok", "reason": "", "files": files}
            except GigapathError as err:
                entry = {"status": "failed", "reason": str(err), "files": []}
            except Exception as err:  # one slide's failure must not stop the others
                log.debug("heatmap of %s failed", sid, exc_info=True)
                entry = {"status": "failed", "reason": f"unexpected {type(err).__name__}: {err}", "files": []}
            if entry["status"] == "failed":
                failed += 1
                console.print(f"[red]failed[/] {sid}: {entry['reason']}")
            write_status(out / sid, {"slide_id": sid, **entry})
            index["slides"][sid] = entry
            progress.advance(task)
    write_json(out / INDEX_FILE, index)
    try_write_run_report(out)  # OUT_HEATMAP/report.html: every slide's heatmap on one page
    console.print(f"{len(ids) - failed} ok, {failed} failed -> {out}")
    return index


def _check_trained_grid(model: Path, embed_dir: Path, tile_size: int, target_mpp: float) -> str | None:
    """Warn when the model was trained on another tile grid than the run's (tile size or mpp); return the warning.

    The grid the model was trained on comes from :func:`.trained_grid.trained_grid`; unknown -> no warning
    (logged at debug level)."""
    from .trained_grid import grid_mismatch, trained_grid

    found = trained_grid(model)
    if found is None:
        log.debug("heatmap: %s records no tile grid and its training embeddings are gone: tile size not checked", model)
        return None
    mismatch = grid_mismatch(found[0], tile_size, target_mpp, str(embed_dir))
    if mismatch is None:
        return None
    msg = (f"heatmap: the model {model} was {mismatch}: it sees other tiles than it learned from, so its "
           f"attention and scores may mean nothing here; embed the slides on the model's grid "
           f"(tiler.params.tile_size, target_mpp) or train on this run's embeddings (trained grid read from "
           f"{found[1]})")
    log.warning("%s", msg)
    return msg


def _weights_note(slide_dir: Path) -> str:
    from ..store import read_h5_attrs

    try:
        attrs = read_h5_attrs(slide_dir / EMBEDDINGS_FILE)
    except Exception:
        return ""
    if attrs.get("weights_source") == "random":
        return "tile embeddings from a tile encoder with RANDOM weights (not pretrained): the picture shows the " \
               "pipeline, not a trained foundation model"
    return ""


def _open(tiles):
    from ..stages.tiling import open_slide

    readers = [tiles.reader] + [r for r in DEFAULT_READERS if r != tiles.reader] if tiles.reader else DEFAULT_READERS
    return open_slide(tiles.slide_path, readers)


def heatmap_slide(slide_dir: Path, out: Path, scorer, *, size: int = 2048, top_k: int = 8, smooth: float = 0.0,
                  scale: str = "percentile", note: str = "") -> list[str]:
    """Everything for one slide; returns the written file names (relative to ``out``).

    Raises:
        HeatmapInputError: missing embed outputs. SlideOpenError/SlideReadError: the slide cannot be read
        again for the pictures (the scores, CSV and GeoJSON are written first and stay).
    """
    tiles = read_slide_tiles(slide_dir)
    sc = scorer.score(tiles.features, tiles.grid_coords)
    files = [p.name for p in write_scores(out, tiles, sc)]
    side = tiles.tile_side_level0
    gj = tile_features_geojson(tiles.slide_id, tiles.coords, side, measurements(sc), tiles.level0_size)
    write_bytes(out / "tiles.geojson", json.dumps(gj).encode())
    files.append("tiles.geojson")
    maps: list[tuple[str, Any, str, np.ndarray]] = []  # (file stem, colour scale, title, raw values)
    pred = "" if sc.slide_scores is None else "; slide prediction " + ", ".join(
        f"{c} {p:.2f}" for c, p in zip(sc.class_names, sc.slide_scores))
    source = sc.source.get("kind", "")
    if sc.attention is not None:
        maps.append(("attention", attention_scale(sc.attention, scale), f"{tiles.slide_id}: attention ({source}, "
                     f"{len(tiles.coords)} tiles){pred}", sc.attention))
    for j, c in enumerate(sc.class_names):
        maps.append((safe_name(c), score_scale(sc.scores[:, j], c, sc.score_unit),
                     f"{tiles.slide_id}: tile score for {c} ({source}){pred}", sc.scores[:, j]))
    with _open(tiles) as wsi:
        thumb = wsi.thumbnail(size)
        th, tw = thumb.shape[:2]
        s = (tw / tiles.level0_size[0], th / tiles.level0_size[1])
        tissue = []
        tj = slide_dir / "tissue.geojson"
        if tj.is_file():
            tissue = tissue_rings(json.loads(tj.read_text()))
        for stem, cs, title, _ in maps:
            overlay = paint_overlay(cs.values, tiles.coords, side, s, (th, tw), smooth)
            write_bytes(out / f"heatmap_{stem}.png", draw_heatmap(thumb, overlay, cs, scale=s, mpp=tiles.mpp,
                                                                  title=title, tissue=tissue, note=note))
            files.append(f"heatmap_{stem}.png")
        if top_k > 0:
            tile_um = tiles.tile_size * tiles.target_mpp
            for stem, cs, _, raw in maps:
                hi, lo = top_bottom(raw, top_k)
                rows = []
                for label, idx in ((f"highest {stem}", hi), (f"lowest {stem}", lo)):
                    imgs = read_tiles(wsi, tiles.coords[idx], side)
                    caps = [_caption(r, raw[i], cs.values[i] if stem == "attention" else None, tiles.coords[i])
                            for r, i in enumerate(idx, start=1)]
                    rows.append((label, imgs, caps))
                what = "attention" if raw is sc.attention else f"tile score ({sc.score_unit.split(' (')[0]})"
                write_bytes(out / f"montage_{stem}.png",
                            draw_montage(rows, f"{tiles.slide_id}: top/bottom {len(hi)} tiles by {what}", tile_um))
                files.append(f"montage_{stem}.png")
    return files


def _caption(rank: int, value: float, pct: float | None, xy) -> str:
    v = f"{value:.3g}" if pct is None else f"{value:.3g}, percentile {pct:.0f}"
    return f"#{rank}: {v}\nx={int(xy[0])}, y={int(xy[1])}"
