"""Per-slide predictions CSV: the record every metric is computed from (and can be recomputed from).

Columns::

    fold, split, slide_id, patient_id,
    binary / multiclass: label (class index), label_name, prob_<class> ...
    multilabel:          y_<label> (0/1) ..., prob_<label> ...

Binary tasks have one probability column, ``prob_<positive class>`` (``class_names[1]``); multiclass tasks one per
class (softmax, rows sum to 1); multilabel tasks one per label (independent sigmoids).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from ..store import write_bytes

BASE_FIELDS = ["fold", "split", "slide_id", "patient_id"]


def prob_columns(task: str, class_names: Sequence[str]) -> list[str]:
    """Probability column names of a task."""
    names = [class_names[1]] if task == "binary" else list(class_names)
    return [f"prob_{n}" for n in names]


def target_columns(task: str, class_names: Sequence[str]) -> list[str]:
    return [f"y_{n}" for n in class_names] if task == "multilabel" else ["label", "label_name"]


def prediction_rows(task: str, class_names: Sequence[str], fold: int, split: str, slide_ids: Sequence[str],
                    patient_ids: Sequence[str], targets: np.ndarray, probs: np.ndarray) -> list[dict]:
    """Rows for one (fold, split): ``targets`` (n,) int class indices or (n, L) 0/1; ``probs`` (n, C) float."""
    pcols = prob_columns(task, class_names)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(slide_ids), -1)
    rows = []
    for i, (sid, pid) in enumerate(zip(slide_ids, patient_ids)):
        row: dict = {"fold": fold, "split": split, "slide_id": sid, "patient_id": pid}
        if task == "multilabel":
            row.update({f"y_{n}": int(targets[i][j]) for j, n in enumerate(class_names)})
        else:
            row.update(label=int(targets[i]), label_name=class_names[int(targets[i])])
        row.update({c: f"{float(v):.8g}" for c, v in zip(pcols, probs[i])})
        rows.append(row)
    return rows


def write_predictions(path: str | Path, rows: list[dict], task: str, class_names: Sequence[str]) -> None:
    """Write prediction rows atomically (columns in the documented order)."""
    fields = BASE_FIELDS + target_columns(task, class_names) + prob_columns(task, class_names)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode())


def read_predictions(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def to_arrays(rows: list[dict], task: str, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(targets, probs) in the shapes :func:`gigapath_core.evaluation.metrics.compute_metrics` takes."""
    pcols = prob_columns(task, class_names)
    probs = np.array([[float(r[c]) for c in pcols] for r in rows], dtype=np.float64).reshape(len(rows), len(pcols))
    if task == "multilabel":
        y = np.array([[int(r[f"y_{n}"]) for n in class_names] for r in rows], dtype=np.int64).reshape(len(rows), -1)
        return y, probs
    y = np.array([int(r["label"]) for r in rows], dtype=np.int64)
    return y, probs[:, 0] if task == "binary" else probs
