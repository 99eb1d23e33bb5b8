"""Fine-tuning data: the labels CSV joined with the tile embeddings of an embed run (SPEC §4).

Labels CSV: columns ``slide_id``, ``patient_id`` and the label column(s). Tile embeddings: the ``embed`` job's
``OUT/<slide_id>/tile_embeddings.h5`` (``features`` (N, D) float32, ``coords`` (N, 2) grid px at 0.5 µm/px).
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
from ..stages.tile_embedding import EMBEDDINGS_FILE
from .config import DataConfig
from .tasks import Task, make_task

log = logging.getLogger("gigapath")
REQUIRED_COLUMNS = ("slide_id", "patient_id")


@dataclass
class SlideRecord:
    """One labelled slide: ``target`` is a class index or an (L,) 0/1 vector; ``path`` its tile_embeddings.h5."""

    slide_id: str
    patient_id: str
    target: Any
    path: Path
    n_tiles: int


@dataclass
class FinetuneData:
    """The slides used for training/evaluation, after selection.

    Attributes:
        task: the Task.
        slides: slide_id -> SlideRecord (only the selected slides).
        tile_dim: width D of the tile embeddings.
        provenance: tile encoder name(s) and weights source(s) found in the h5 attributes.
        excluded: slide_id -> reason (missing embeddings, zero tiles, not the patient's largest slide).
    """

    task: Task
    slides: dict[str, SlideRecord]
    tile_dim: int
    provenance: dict[str, list[str]] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)

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


def _find_embeddings(folders: list[str], slide_id: str) -> Path | None:
    for folder in folders:
        p = Path(folder) / slide_id / EMBEDDINGS_FILE
        if p.is_file():
            return p
    return None


def _h5_info(path: Path) -> tuple[int, int, dict[str, str]]:
    import h5py

    with h5py.File(path, "r") as f:
        if "features" not in f or "coords" not in f:
            raise ConfigError("data.embeddings",
                              f"{path} has no 'features'/'coords' datasets (not a tile_embeddings.h5)")
        shape = f["features"].shape
        attrs = {k: (v.decode() if isinstance(v, bytes) else str(v)) for k, v in f.attrs.items()
                 if k in ("tile_encoder", "weights_source", "coords_unit")}
    return int(shape[0]), int(shape[1]) if len(shape) == 2 else 0, attrs


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
    records: list[SlideRecord] = []
    excluded: dict[str, str] = {}
    seen: set[str] = set()
    widths: dict[int, str] = {}
    provenance: dict[str, set[str]] = {"tile_encoder": set(), "weights_source": set()}
    for i, row in enumerate(rows):
        where = f"{cfg.labels} row {i + 2}"
        sid, pid = (row.get("slide_id") or "").strip(), (row.get("patient_id") or "").strip()
        if not sid or not pid:
            raise ConfigError("data.labels", f"{where}: empty slide_id or patient_id")
        if sid in seen:
            raise ConfigError("data.labels", f"{where}: slide_id {sid!r} appears twice")
        seen.add(sid)
        target = task.encode(row, where)
        path = _find_embeddings(cfg.embeddings, sid)
        if path is None:
            if cfg.missing_embeddings == "error":
                raise ConfigError("data.embeddings", f"no {sid}/{EMBEDDINGS_FILE} in {', '.join(cfg.embeddings)} "
                                  f"(labels {where}); run the embed job on it or set data.missing_embeddings: skip")
            excluded[sid] = "no tile embeddings"
            continue
        n, d, attrs = _h5_info(path)
        if n == 0:
            excluded[sid] = "zero tiles"
            continue
        widths.setdefault(d, sid)
        for k in provenance:
            provenance[k].add(attrs.get(k, "unknown"))
        records.append(SlideRecord(sid, pid, target, path, n))
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
                        {k: sorted(v) for k, v in provenance.items()}, excluded)


def load_slide(record: SlideRecord, max_tiles: int | None = None, rng: np.random.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, D) float32 features and (1, N, 2) float32 grid-px coords of one slide.

    With ``max_tiles`` and ``rng``, a random subset of at most ``max_tiles`` tiles, kept in row-major order.
    """
    import h5py

    with h5py.File(record.path, "r") as f:
        feats = f["features"][()]
        coords = f["coords"][()]
    if max_tiles is not None and rng is not None and len(feats) > max_tiles:
        keep = np.sort(rng.choice(len(feats), size=max_tiles, replace=False))
        feats, coords = feats[keep], coords[keep]
    return (torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[None],
            torch.from_numpy(np.ascontiguousarray(coords, dtype=np.float32))[None])
