"""Fine-tuning data: the labels CSV joined with the tile embeddings of an embed run (Xu et al. 2024, Methods: mutation
prediction, cancer subtyping).

Labels CSV: columns ``slide_id``, ``patient_id`` and the label column(s). Tile embeddings: the ``embed`` job's
``OUT/<slide_id>/tile_embeddings.h5`` or another tool's feature files (TRIDENT, CLAM, STAMP, prov-gigapath; a
folder or a CSV of paths, :mod:`gigapath_core.interop.locate`), all read by
:func:`gigapath_core.interop.read_tile_features`, which checks the units and gives grid px at 0.5 µm/px.
Per patient either the slide with the most tiles is kept (the paper) or all slides.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..interop import FeatureLocator, read_tile_features
from ..interop.locate import EMBEDDINGS_FILE
from .config import DataConfig
from .tasks import Task, make_task

log = logging.getLogger("gigapath")
REQUIRED_COLUMNS = ("slide_id", "patient_id")


@dataclass
class SlideRecord:
    """One labelled slide: ``target`` is a class index or an (L,) 0/1 vector; ``path`` its tile-feature file,
    read with ``read_options`` (:func:`gigapath_core.interop.read_tile_features` keywords)."""

    slide_id: str
    patient_id: str
    target: Any
    path: Path
    n_tiles: int
    read_options: dict = field(default_factory=dict)


@dataclass
class FinetuneData:
    """The slides used for training/evaluation, after selection.

    Attributes:
        task: the Task.
        slides: slide_id -> SlideRecord (only the selected slides).
        tile_dim: width D of the tile embeddings.
        provenance: tile encoder name(s) and weights source(s) found in the h5 attributes.
        excluded: slide_id -> reason (missing embeddings, zero tiles, not the patient's largest slide).
        grid: the tile grid(s) the embeddings were cut on: ``tile_size`` (px) and ``target_mpp`` (µm/px), each a
            sorted list of the values found (one value each when every slide was tiled alike); recorded in
            ``metrics.json`` ``models`` so that ``gigapath heatmap --model`` can check a run against them.
    """

    task: Task
    slides: dict[str, SlideRecord]
    tile_dim: int
    provenance: dict[str, list[str]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    grid: dict[str, list] = field(default_factory=dict)

    def ids(self) -> list[str]:
        return sorted(self.slides)


def read_labels(path: str | Path) -> list[dict[str, str]]:
    """Rows of the labels CSV. Raises ConfigError (``data.labels``) if it lacks slide_id or patient_id."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ConfigError("data.labels", f"{path} needs columns {', '.join(REQUIRED_COLUMNS)}; missing "
                          f"{', '.join(missing)} (has {', '.join(header) or 'no header'})")
    if not rows:
        raise ConfigError("data.labels", f"{path} has no rows")
    return rows


def read_options(cfg: DataConfig, level0_mpp: float | None = None) -> dict:
    """Keywords of :func:`read_tile_features` from the data config (a CSV row's ``level0_mpp`` wins)."""
    return {"level0_mpp": level0_mpp or cfg.level0_mpp, "coords_unit": cfg.coords_unit, "tile_size": cfg.tile_size,
            "key_prefix": "data."}


def _provenance(tf) -> dict[str, str]:
    encoder = tf.attrs.get("tile_encoder") or tf.attrs.get("extractor")
    if not encoder and tf.path.parent.name.startswith("features_"):  # TRIDENT features_<encoder>/
        encoder = tf.path.parent.name[len("features_"):]
    return {"tile_encoder": str(encoder or f"unknown ({tf.source_format})"),
            "weights_source": str(tf.attrs.get("weights_source", "unknown"))}


def load_data(cfg: DataConfig) -> FinetuneData:
    """Join labels and embeddings, then keep the largest slide per patient (or all).

    Raises:
        ConfigError: bad CSV (missing columns, duplicate slide ids, unknown label values), a slide without
            embeddings under ``missing_embeddings: error``, embeddings of different widths, or no usable slide.
    """
    rows = read_labels(cfg.labels)
    header = list(rows[0])
    absent = [c for c in cfg.label_columns if c not in header]
    if absent:
        raise ConfigError("data.label_columns", f"{cfg.labels} has no column {absent[0]!r} (has {', '.join(header)})")
    task = make_task(cfg.task, cfg.label_columns, [[r.get(c) or "" for r in rows] for c in cfg.label_columns],
                     cfg.classes, cfg.ordinal)
    locator = FeatureLocator(cfg.embeddings, "data.embeddings")
    records: list[SlideRecord] = []
    excluded: dict[str, str] = {}
    seen: set[str] = set()
    widths: dict[int, str] = {}
    provenance: dict[str, set[str]] = {"tile_encoder": set(), "weights_source": set()}
    grid: dict[str, set] = {"tile_size": set(), "target_mpp": set()}
    for i, row in enumerate(rows):
        where = f"{cfg.labels} row {i + 2}"
        sid, pid = (row.get("slide_id") or "").strip(), (row.get("patient_id") or "").strip()
        if not sid or not pid:
            raise ConfigError("data.labels", f"{where}: empty slide_id or patient_id")
        if sid in seen:
            raise ConfigError("data.labels", f"{where}: slide_id {sid!r} appears twice")
        seen.add(sid)
        target = task.encode(row, where)
        src = locator.find(sid)
        if src is None:
            if cfg.missing_embeddings == "error":
                raise ConfigError("data.embeddings", f"no tile features of {sid} ({sid}/{EMBEDDINGS_FILE}, {sid}.h5, "
                                  f"h5_files/{sid}.h5 or pt_files/{sid}.pt) in {', '.join(cfg.embeddings)} "
                                  f"(labels {where}); run the embed job on it or set data.missing_embeddings: skip")
            excluded[sid] = "no tile embeddings"
            continue
        options = read_options(cfg, src.level0_mpp)
        tf = read_tile_features(src.path, **options)
        n, d = len(tf), tf.dim
        if n == 0:
            excluded[sid] = "zero tiles"
            continue
        widths.setdefault(d, sid)
        for k, v in _provenance(tf).items():
            provenance[k].add(v)
        grid["tile_size"].add(int(tf.tile_size))
        grid["target_mpp"].add(float(tf.target_mpp))
        records.append(SlideRecord(sid, pid, target, src.path, n, options))
    if len(widths) > 1:
        (d1, s1), (d2, s2) = list(widths.items())[:2]
        raise ConfigError("data.embeddings", f"tile embeddings of different widths: {s1} is {d1}-d, {s2} is {d2}-d "
                          "(mixing tile encoders?)")
    if excluded:
        listed = ", ".join(f"{s} ({r})" for s, r in list(excluded.items())[:10])
        log.warning("left out %d slide(s): %s%s", len(excluded), listed, " ..." if len(excluded) > 10 else "")
    if cfg.slides_per_patient == "largest":
        best: dict[str, SlideRecord] = {}
        for r in records:  # most tiles wins; ties go to the smaller slide_id (deterministic)
            b = best.get(r.patient_id)
            if b is None or (r.n_tiles, b.slide_id) > (b.n_tiles, r.slide_id):
                best[r.patient_id] = r
        for r in records:
            if best[r.patient_id] is not r:
                excluded[r.slide_id] = f"not the largest slide of patient {r.patient_id}"
        records = list(best.values())
    if not records:
        raise ConfigError("data", f"no usable slide: none of the {len(rows)} labelled slides has tile embeddings")
    return FinetuneData(task, {r.slide_id: r for r in records}, next(iter(widths)),
                        {k: sorted(v) for k, v in provenance.items()}, excluded,
                        {k: sorted(v) for k, v in grid.items()})


def load_slide(record: SlideRecord, max_tiles: int | None = None, rng: np.random.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, D) float32 features and (1, N, 2) float32 grid-px coords (``grid_coords``) of one slide.

    With ``max_tiles`` and ``rng``, a random subset of at most ``max_tiles`` tiles, kept in row-major order.
    """
    tf = read_tile_features(record.path, **record.read_options)
    feats, coords = tf.features, tf.grid_coords
    if max_tiles is not None and rng is not None and len(feats) > max_tiles:
        keep = np.sort(rng.choice(len(feats), size=max_tiles, replace=False))
        feats, coords = feats[keep], coords[keep]
    return (torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32))[None])
