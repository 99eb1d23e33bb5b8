"""The raw per-tile scores next to the pictures: ``scores.h5`` and ``scores.csv`` (one row per tile)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .render import percentile_rank
from .scores import TileScores
from .slide_data import SlideTiles

SCORES_H5, SCORES_CSV = "scores.h5", "scores.csv"


def score_column(name: str) -> str:
    """CSV/measurement column of a class score: ``score_<class>``."""
    return f"score_{name}"


def write_scores(folder: str | Path, tiles: SlideTiles, sc: TileScores) -> tuple[Path, Path]:
    """Write ``scores.h5`` and ``scores.csv`` into ``folder`` atomically. Returns their paths.

    ``scores.h5`` (root attribute ``format_version`` = 2): ``tile_index`` (N,) int64 (row in tile_embeddings.h5),
    ``coords`` (N, 2) int64 level-0 px top-left, ``grid_coords`` (N, 2) int64 px at ``target_mpp``, ``scores``
    (N, C) float32, and if the model has attention ``attention`` (N,) float32 (sums to 1) and
    ``attention_percentile`` (N,) float32 (0-100); attributes ``class_names``, ``score_unit``, ``slide_scores``,
    ``source`` (JSON), ``slide_id``, mpp. ``scores.csv``: slide_id, tile_index, x, y (level-0 px), grid_x, grid_y,
    [attention, attention_percentile,] score_<class>...
    """
    from ..store import write_bytes, write_h5

    folder = Path(folder)
    n = len(tiles.coords)
    data = {"tile_index": np.arange(n, dtype=np.int64), "coords": tiles.coords, "grid_coords": tiles.grid_coords,
            "scores": sc.scores.astype(np.float32).reshape(n, -1)}
    if sc.attention is not None:
        data["attention"] = sc.attention.astype(np.float32)
        data["attention_percentile"] = percentile_rank(sc.attention)
    attrs = {"format_version": 2, "slide_id": tiles.slide_id, "class_names": json.dumps(sc.class_names),
             "score_unit": sc.score_unit, "source": json.dumps(sc.source, default=str),
             "slide_scores": json.dumps(None if sc.slide_scores is None else [float(v) for v in sc.slide_scores]),
             "coords_unit": "level-0 px (top-left corner)",
             "grid_coords_unit": f"px at {tiles.target_mpp} um/px", "source_mpp_x": tiles.mpp[0],
             "source_mpp_y": tiles.mpp[1], "target_mpp": tiles.target_mpp, "tile_size": tiles.tile_size}
    write_h5(folder / SCORES_H5, data, attrs)
    header = ["slide_id", "tile_index", "x", "y", "grid_x", "grid_y"]
    if sc.attention is not None:
        header += ["attention", "attention_percentile"]
    header += [score_column(c) for c in sc.class_names]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for i in range(n):
        row = [tiles.slide_id, i, int(tiles.coords[i, 0]), int(tiles.coords[i, 1]), int(tiles.grid_coords[i, 0]),
               int(tiles.grid_coords[i, 1])]
        if sc.attention is not None:
            row += [f"{float(data['attention'][i]):.9g}", f"{float(data['attention_percentile'][i]):.6g}"]
        row += [f"{float(v):.9g}" for v in data["scores"][i]]
        w.writerow(row)
    write_bytes(folder / SCORES_CSV, buf.getvalue().encode())
    return folder / SCORES_H5, folder / SCORES_CSV


def measurements(sc: TileScores) -> dict[str, np.ndarray]:
    """QuPath measurement columns: attention, attention percentile, and one ``score_<class>`` per class."""
    out = {}
    if sc.attention is not None:
        out["attention"] = sc.attention
        out["attention_percentile"] = percentile_rank(sc.attention)
    for j, c in enumerate(sc.class_names):
        out[score_column(c)] = sc.scores[:, j]
    return out
