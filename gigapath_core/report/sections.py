"""What goes on the report page, read from the files each job writes: the embed run's slides (manifest.csv,
tiles.h5, thumbnail.png, heatmaps), a finetune run's metric tables and ROC/PR plots, an ablation's table."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .images import data_uri

#: row order: failed, then unfinished (locked, pending), then the rest (ok; skipped in manifests before this_run) in
#: manifest order
STATUS_ORDER = {"failed": 0, "locked": 1, "pending": 1}
STAGE_SECONDS = ("seconds_tiling", "seconds_tile_encoder", "seconds_slide_encoder", "seconds_total")


@dataclass
class SlideRow:
    slide_id: str
    status: str
    reason: str = ""
    error_type: str = ""
    n_tiles: str = ""
    reader: str = ""
    mpp: str = ""
    weights: str = ""
    seconds: dict[str, str] = field(default_factory=dict)
    thumbnail: str | None = None  # data URI of a small copy of OUT/<slide_id>/thumbnail.png
    thumbnail_href: str | None = None  # that PNG, relative to OUT (the thumbnail links to it)
    links: list[tuple[str, str]] = field(default_factory=list)  # (label, relative href)
    preview: tuple[str, str] | None = None  # (data URI of the first heatmap, relative href)
    this_run: str = ""  # manifest column: processed | skipped | failed | locked (what the last run did)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mpp(slide_dir: Path) -> str:
    p = slide_dir / "tiles.h5"
    if not p.is_file():
        return ""
    try:
        import h5py

        with h5py.File(p, "r") as f:
            x, y = float(f.attrs["source_mpp_x"]), float(f.attrs["source_mpp_y"])
    except Exception:
        return ""
    return f"{x:.4f}" if abs(x - y) < 1e-4 else f"{x:.4f} × {y:.4f}"


def heatmap_dirs(out_dir: Path) -> list[Path]:
    """Heatmap output folders of this embed run: ``OUT/heatmaps`` and any sibling or child folder whose
    heatmaps.json names ``OUT`` as its embeddings folder."""
    out_dir = out_dir.resolve()
    found = []
    for index in [*out_dir.glob("*/heatmaps.json"), *out_dir.parent.glob("*/heatmaps.json")]:
        try:
            emb = json.loads(index.read_text()).get("embeddings")
        except (OSError, json.JSONDecodeError):
            continue
        if emb and Path(emb).resolve() == out_dir and index.parent not in found:
            found.append(index.parent)
    return found


def slide_rows(out_dir: Path, thumb_px: int = 120) -> list[SlideRow]:
    """One row per slide of an embed run (``manifest.csv``, else the slide folders' status.json), failed slides
    first, then in manifest order."""
    from ..store import MANIFEST_FIELDS, read_status

    manifest = out_dir / "manifest.csv"
    if manifest.is_file():
        raw = read_csv(manifest)
    else:
        markers = [read_status(p.parent) or {} for p in sorted(out_dir.glob("*/status.json"))]
        raw = [{k: m.get(k, "") for k in MANIFEST_FIELDS} for m in markers if m.get("slide_id")]
    maps = heatmap_dirs(out_dir)
    rows = []
    for r in raw:
        sid = r.get("slide_id", "")
        sdir = out_dir / sid
        row = SlideRow(sid, r.get("status", ""), r.get("reason", ""), r.get("error_type", ""), r.get("n_tiles", ""),
                       r.get("reader", ""), _mpp(sdir), r.get("weights", ""),
                       {k: r.get(k, "") for k in STAGE_SECONDS},
                       data_uri(sdir / "thumbnail.png", thumb_px) if sid else None, this_run=r.get("this_run", ""))
        if row.thumbnail:
            row.thumbnail_href = os.path.relpath(sdir / "thumbnail.png", out_dir)
        for hdir in maps:
            hs = hdir / sid
            tag = "" if len(maps) == 1 else f" ({hdir.name})"
            heatmaps = sorted(hs.glob("heatmap_*.png"), key=lambda f: (f.stem != "heatmap_attention", f.name))
            if heatmaps and row.preview is None:
                uri = data_uri(heatmaps[0], thumb_px)
                row.preview = (uri, os.path.relpath(heatmaps[0], out_dir)) if uri else None
            for f in heatmaps:
                row.links.append(("map: " + f.stem.split("_", 1)[1] + tag, os.path.relpath(f, out_dir)))
            for f in sorted(hs.glob("montage_*.png"), key=lambda f: (f.stem != "montage_attention", f.name)):
                row.links.append(("top tiles: " + f.stem.split("_", 1)[1] + tag, os.path.relpath(f, out_dir)))
            if (hs / "tiles.geojson").is_file():
                row.links.append(("QuPath GeoJSON" + tag, os.path.relpath(hs / "tiles.geojson", out_dir)))
            if (hs / "scores.csv").is_file():
                row.links.append(("scores.csv" + tag, os.path.relpath(hs / "scores.csv", out_dir)))
        rows.append(row)
    order = {id(r): i for i, r in enumerate(rows)}
    rows.sort(key=lambda r: (STATUS_ORDER.get(r.status, 2), order[id(r)]))  # stable: manifest order within
    return rows


def finetune_tables(run_dir: Path) -> dict[str, Any] | None:
    """A finetune folder's metrics: results table (metric, mean ± s.e.m., per fold), per-fold sizes, notes and
    the ROC/PR plots as data URIs; None if ``metrics.json`` is absent."""
    mpath = run_dir / "metrics.json"
    if not mpath.is_file():
        return None
    m = json.loads(mpath.read_text())
    results = None
    if (run_dir / "results.csv").is_file():
        with open(run_dir / "results.csv", newline="") as f:
            rr = list(csv.reader(f))
        keep = [i for i, h in enumerate(rr[0]) if h not in ("mean", "sem")] if rr else []
        results = [[row[i] for i in keep] for row in rr]
    sizes = [["fold", "train", "val", "test"]] + [[str(f.get("fold")), str(f.get("n_train", "")),
                                                   str(f.get("n_val", "")), str(f.get("n_test", ""))]
                                                  for f in m.get("folds", [])]
    plots = [(n, data_uri(run_dir / f"{n}.png", 640, "PNG")) for n in ("roc", "pr")]
    task = m.get("task", {})
    return {"title": f"{task.get('type', '')}: {' vs '.join(task.get('classes', []))}", "k": m.get("k"),
            "n_slides": m.get("n_slides"), "n_patients": m.get("n_patients"), "results": results, "sizes": sizes,
            "notes": m.get("notes", []), "models": m.get("models", {}),
            "plots": [(n, u) for n, u in plots if u]}


def ablation_tables(run_dir: Path) -> dict[str, Any] | None:
    """An ablation folder's comparison table and each variant's finetune tables; None without ablation.csv."""
    path = run_dir / "ablation.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    info = json.loads((run_dir / "ablation.json").read_text()) if (run_dir / "ablation.json").is_file() else {}
    variants = {}
    for row in table[1:]:
        t = finetune_tables(run_dir / row[0]) if row else None
        if t:
            variants[row[0]] = t
    return {"table": table, "reference": info.get("reference"), "notes": info.get("notes", []),
            "variants": variants}


def _file_order(name: str) -> tuple:
    kinds = ("heatmap_attention", "heatmap_", "montage_attention", "montage_", "tiles.geojson", "scores.")
    return next((i for i, k in enumerate(kinds) if name.startswith(k)), len(kinds)), name


def _file_label(name: str) -> str:
    """``heatmap_IHC.png`` -> ``map: IHC``; ``montage_attention.png`` -> ``top tiles: attention``; data files
    keep their names (``tiles.geojson (QuPath)``)."""
    stem = name.rsplit(".", 1)[0]
    if name.startswith("heatmap_"):
        return "map: " + stem.split("_", 1)[1]
    if name.startswith("montage_"):
        return "top tiles: " + stem.split("_", 1)[1]
    return name + (" (QuPath)" if name.endswith(".geojson") else "")


def heatmap_rows(run_dir: Path, preview_px: int = 260) -> dict[str, Any] | None:
    """A ``gigapath heatmap`` output folder: the run (model, options) and one row per slide (failed first) with a
    preview of its first heatmap, the slide prediction, tile count and links; None without heatmaps.json."""
    index_file = run_dir / "heatmaps.json"
    if not index_file.is_file():
        return None
    index = json.loads(index_file.read_text())
    rows = []
    for sid, entry in index.get("slides", {}).items():
        sdir = run_dir / sid
        files = [f for f in entry.get("files", []) if (sdir / f).is_file()]
        maps = sorted((f for f in files if f.startswith("heatmap_")), key=lambda f: (f != "heatmap_attention.png", f))
        pred, n = "", ""
        if (sdir / "scores.h5").is_file():
            try:
                import h5py

                with h5py.File(sdir / "scores.h5", "r") as h:
                    names = json.loads(h.attrs["class_names"])
                    scores = json.loads(h.attrs["slide_scores"])
                    n = str(h["coords"].shape[0])
                pred = ", ".join(f"{c} {p:.2f}" for c, p in zip(names, scores or []))
            except Exception:
                pass
        rows.append({"slide_id": sid, "status": entry.get("status", ""), "reason": entry.get("reason", ""),
                     "n_tiles": n, "prediction": pred,
                     "preview": data_uri(sdir / maps[0], preview_px) if maps else None,
                     "preview_href": f"{sid}/{maps[0]}" if maps else "",
                     "links": [(_file_label(f), f"{sid}/{f}") for f in sorted(files, key=_file_order)]})
    rows.sort(key=lambda r: STATUS_ORDER.get(r["status"], 2))
    return {"model": index.get("model", ""), "kind": index.get("kind", ""), "folds": index.get("folds", ""),
            "embeddings": index.get("embeddings", ""), "rows": rows}
