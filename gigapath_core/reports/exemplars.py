"""Exemplar selection for the few-shot LLM cleaner: embed every report, k-means, keep the report nearest each
centre (Xu et al. 2024, Methods, "Vision–language alignment": 4 clusters, the 4 representatives cleaned by
hand and given to the LLM as in-context examples).

Embeddings: any ``text_encoder`` preset or plugin (``minilm-l6`` offline, ``pubmedbert`` when its weights are
present), L2-normalised so that k-means on them groups by cosine similarity. Clustering:
``sklearn.cluster.KMeans(n_clusters=k, random_state=seed, n_init=10)``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..errors import ConfigError
from ..store import write_bytes

HEADER = """\
# Report exemplars for the LLM cleaner (gigapath reports exemplars), one per k-means cluster.
# Clean each report BY HAND: write under `cleaned:` the text you want the LLM to produce for it (keep what
# matters for the diagnosis; drop hospital, physician and patient details, dates, numbers, boilerplate).
# Then give this file to the cleaner: report_cleaner {name: llm, params: {exemplars: THIS_FILE, ...}}.
# Exemplars are shown to the LLM in this order.
"""


def read_reports(path: str | Path, column: str = "report") -> tuple[list[dict], list[str]]:
    """CSV -> (rows as dicts, the ``column`` text of each row). Raises ConfigError for a missing file/column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("reports", f"not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError("reports", f"{path}: no rows")
    if column not in rows[0]:
        raise ConfigError("column", f"{path} has no column {column!r} (has {', '.join(rows[0])})")
    return rows, [(r[column] or "").strip() for r in rows]


def embed_reports(texts: list[str], text_encoder: str = "minilm-l6", batch_size: int = 16,
                  registry=()) -> np.ndarray:
    """N reports -> (N, D) float32 L2-normalised embeddings from the ``text_encoder`` (truncated at its
    ``max_length`` tokens). Raises WeightsError if the encoder's weights are not available."""
    import torch

    from ..api import build

    enc = build("text_encoder", text_encoder, registry=registry)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out.append(enc(texts[i : i + batch_size]).float())
    emb = torch.nn.functional.normalize(torch.cat(out), dim=-1)
    return emb.cpu().numpy().astype(np.float32)


@dataclass
class Selection:
    """k-means result. ``labels`` (N,) int cluster of each report; ``centres`` (k, D); ``indices`` (k,) row of
    the report nearest each centre; ``sizes`` (k,) reports per cluster; ``distances`` (k,) their distances."""

    labels: np.ndarray
    centres: np.ndarray
    indices: np.ndarray
    sizes: np.ndarray
    distances: np.ndarray


def select_exemplars(embeddings: np.ndarray, k: int = 4, seed: int = 0) -> Selection:
    """Seeded k-means on (N, D) embeddings; cluster c's exemplar is the member nearest its centre.

    Clusters are numbered by the row of their exemplar (first in the CSV = cluster 0), so the numbering does not
    depend on k-means' internal label order. Raises ConfigError if there are fewer distinct reports than k.
    """
    from sklearn.cluster import KMeans

    n_distinct = len(np.unique(embeddings.round(6), axis=0))
    if k < 1 or n_distinct < k:
        raise ConfigError("k", f"need k >= 1 and at least k distinct reports; got k={k}, {n_distinct} distinct")
    km = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(embeddings)
    raw_idx, raw_dist = [], []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        d = np.linalg.norm(embeddings[members] - km.cluster_centers_[c], axis=1)
        raw_idx.append(int(members[np.argmin(d)]))
        raw_dist.append(float(d.min()))
    order = np.argsort(raw_idx)  # new cluster id -> old id
    relabel = np.empty(k, dtype=np.int64)
    relabel[order] = np.arange(k)
    labels = relabel[km.labels_]
    return Selection(
        labels=labels,
        centres=km.cluster_centers_[order],
        indices=np.asarray(raw_idx)[order],
        sizes=np.bincount(labels, minlength=k),
        distances=np.asarray(raw_dist)[order],
    )


class _BlockDumper(yaml.SafeDumper):
    pass


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def write_exemplars(path: str | Path, rows: list[dict], texts: list[str], sel: Selection, meta: dict) -> None:
    """Write the hand-cleaning file (YAML, atomically): ``meta`` then ``exemplars:``, one entry per cluster with
    ``cluster``, ``cluster_size``, ``row`` (0-based data row of the CSV), the row's other columns
    (``columns``), ``raw`` and an empty ``cleaned``. :func:`gigapath_core.reports.prompt.load_exemplars` reads it."""
    items = []
    for c, (i, size) in enumerate(zip(sel.indices.tolist(), sel.sizes.tolist())):
        other = {k: v for k, v in rows[i].items() if k != meta.get("column") and v}
        items.append({"cluster": c, "cluster_size": int(size), "row": int(i), "columns": other,
                      "raw": texts[i].replace("\r\n", "\n"), "cleaned": ""})
    doc = {**meta, "exemplars": items}
    text = HEADER + yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, allow_unicode=True, width=120)
    write_bytes(path, text.encode("utf-8"))


def choose_exemplars(reports: str | Path, out: str | Path, k: int = 4, text_encoder: str = "minilm-l6",
                     column: str = "report", seed: int = 0, registry=()) -> Selection:
    """The ``gigapath reports exemplars`` command: read, embed, cluster, write ``out``; returns the Selection."""
    rows, texts = read_reports(reports, column)
    empty = [str(i + 2) for i, t in enumerate(texts) if not t]
    if empty:
        raise ConfigError("reports", f"{reports}: empty {column!r} on CSV line(s) {', '.join(empty[:10])}")
    sel = select_exemplars(embed_reports(texts, text_encoder, registry=registry), k, seed)
    meta = {"source": str(reports), "column": column, "text_encoder": text_encoder, "k": k, "seed": seed,
            "n_reports": len(texts)}
    write_exemplars(out, rows, texts, sel, meta)
    return sel
