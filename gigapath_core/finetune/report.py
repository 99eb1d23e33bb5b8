"""Reports of a finetune run: metrics.json, predictions.csv, results table, ROC/PR plots, provenance notes.

Every number in ``metrics.json`` is recomputed from the saved per-fold predictions (test split), so the file and
``predictions.csv`` always agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import __version__
from ..evaluation.folds import Splits
from ..evaluation.metrics import compute_metrics
from ..evaluation.plots import plot_curves
from ..evaluation.predictions import to_arrays, write_predictions
from ..evaluation.statistics import format_mean_sem, summarise_folds
from ..evaluation.tables import print_table, results_rows, to_csv, to_markdown
from ..progress import console
from ..store import write_bytes, write_json
from .config import FinetuneConfig
from .data import FinetuneData


def provenance_notes(data: FinetuneData, models: dict[str, Any] | None = None) -> list[str]:
    """Warnings that belong next to the numbers (random weights, left-out slides)."""
    notes = []
    if "random" in data.provenance.get("weights_source", []):
        notes.append("the tile embeddings come from a tile encoder with RANDOM weights (not pretrained): these "
                     "numbers measure the pipeline, not a foundation model")
    if models and models.get("slide_encoder_parameters") and models.get("slide_encoder_weights") == "random":
        notes.append(f"the slide encoder {models['slide_encoder']!r} started from RANDOM weights (not pretrained)")
    if data.excluded:
        notes.append(f"{len(data.excluded)} labelled slide(s) left out (see metrics.json 'excluded')")
    return notes


def announce_provenance(data: FinetuneData) -> None:
    enc = ", ".join(data.provenance.get("tile_encoder", [])) or "unknown"
    ws = ", ".join(data.provenance.get("weights_source", [])) or "unknown"
    state = "[bold red]RANDOM weights (not pretrained)[/]" if "random" in ws.split(", ") else f"weights {ws}"
    console.print(f"tile embeddings: {data.tile_dim}-d from tile encoder {enc} with {state}")


def _fold_metrics(rows: list[dict], split: str, cfg: FinetuneConfig, data: FinetuneData) -> dict[str, float] | None:
    sel = [r for r in rows if r["split"] == split]
    if not sel:
        return None
    y, p = to_arrays(sel, data.task.type, data.task.class_names)
    return compute_metrics(data.task.type, y, p, data.task.class_names, data.task.ordinal, cfg.threshold)


def write_report(cfg: FinetuneConfig, data: FinetuneData, splits: Splits, sizes: list[dict], results: list[dict],
                 fingerprint: str) -> dict[str, Any]:
    """Write predictions.csv, metrics.json, results.md/.csv and the plots into ``cfg.output``; print the table.

    Returns the metrics.json content: ``summary`` (test metrics: mean, sem, n, per-fold values), ``folds``
    (sizes, test and val metrics per fold), task, models, notes.
    """
    out = Path(cfg.output)
    task = data.task
    all_rows = [r for res in results for r in res["rows"]]
    write_predictions(out / "predictions.csv", all_rows, task.type, task.class_names)
    folds = []
    for f, res in enumerate(results):
        folds.append({"fold": f, **{f"n_{k}": v for k, v in sizes[f].items()},
                      "test": _fold_metrics(res["rows"], "test", cfg, data),
                      "val": _fold_metrics(res["rows"], "val", cfg, data)})
    summary = summarise_folds([f["test"] for f in folds])
    models = results[0]["models"] if results else {}
    notes = provenance_notes(data, models)
    metrics = {
        "task": {"type": task.type, "classes": list(task.class_names), "label_columns": list(task.label_columns),
                 "ordinal": task.ordinal, "threshold": cfg.threshold},
        "k": splits.k,
        "n_slides": len(data.slides),
        "n_patients": len({r.patient_id for r in data.slides.values()}),
        "summary": summary,
        "folds": folds,
        "models": {**models, "tile_encoder": data.provenance.get("tile_encoder"),
                   "tile_encoder_weights": data.provenance.get("weights_source"), "tile_dim": data.tile_dim,
                   "tile_size": data.grid.get("tile_size"), "target_mpp": data.grid.get("target_mpp")},
        "notes": notes,
        "excluded": data.excluded,
        "config_fingerprint": fingerprint,
        "gigapath_version": __version__,
    }
    write_json(out / "metrics.json", metrics)
    header, rows = results_rows(summary)
    title = f"{task.type} {' vs '.join(task.class_names) if task.type != 'multilabel' else ', '.join(task.class_names)}"
    md = (f"# Results: {title}\n\n{splits.k}-fold cross-validation (test splits), mean ± s.e.m. over folds.\n\n"
          + to_markdown(header, rows) + "".join(f"\n> Note: {n}\n" for n in notes))
    write_bytes(out / "results.md", md.encode())
    write_bytes(out / "results.csv", to_csv(header, rows).encode())
    if cfg.plots:
        plot_curves([r for r in all_rows if r["split"] == "test"], task.type, task.class_names, out, title)
    print_table(f"{splits.k}-fold CV: {title}", header[:2], [r[:2] for r in rows])
    for n in notes:
        console.print(f"[yellow]note:[/] {n}")
    if "auroc" in summary:
        console.print(f"AUROC {format_mean_sem(summary['auroc']['mean'], summary['auroc']['sem'])} (mean ± s.e.m. "
                      f"over {summary['auroc']['n']} folds) -> {out / 'metrics.json'}")
    return metrics
