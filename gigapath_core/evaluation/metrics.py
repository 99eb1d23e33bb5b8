"""Slide-level classification metrics, all computed by scikit-learn (Xu et al. 2024, Methods: mutation prediction,
cancer subtyping: AUROC, AUPRC, balanced accuracy;
quadratic-weighted kappa for ordinal classes).

Task types and the arrays they take:

- ``binary``: ``y_true`` (n,) int in {0, 1}; ``probs`` (n,) float, P(class 1 = ``class_names[1]``).
- ``multiclass``: ``y_true`` (n,) int in [0, C); ``probs`` (n, C) float, rows sum to 1 (softmax).
- ``multilabel``: ``y_true`` (n, L) int in {0, 1}; ``probs`` (n, L) float, independent sigmoids.

Metric names returned (a flat dict, float values; NaN where a metric is undefined on this set, e.g. a class
missing from a test fold):

- ``auroc``, ``auprc``: binary: of the positive class; multiclass: macro over classes, one-vs-rest
  (= ``roc_auc_score(..., multi_class="ovr", average="macro")`` when every class is present); multilabel:
  macro over labels.
- ``auroc/<name>``, ``auprc/<name>``: per class (one-vs-rest) or per label (multiclass, multilabel).
- ``bacc``: ``balanced_accuracy_score`` of argmax (multiclass) or of ``prob >= threshold`` (binary); multilabel:
  mean over labels, ``bacc/<name>`` per label.
- ``qwk``: ``cohen_kappa_score(weights="quadratic")`` of argmax, for ordinal multiclass tasks only.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np

log = logging.getLogger("gigapath")
TASK_TYPES = ("binary", "multiclass", "multilabel")


def _binary_scores(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(AUROC, AUPRC) of one binary problem; NaN if ``y`` holds one class only."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan"), float("nan")
    return float(roc_auc_score(y, p)), float(average_precision_score(y, p))


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _bacc(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": still well defined
        return float(balanced_accuracy_score(y, pred))


def compute_metrics(task: str, y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    ordinal: bool = False, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of one evaluation set (one fold's test split).

    Args:
        task: ``binary``, ``multiclass`` or ``multilabel`` (shapes in the module docstring).
        y_true, probs: targets and predicted probabilities.
        class_names: binary: [negative, positive]; multiclass: C class names; multilabel: L label names.
        ordinal: multiclass classes are ordered (adds ``qwk``).
        threshold: decision threshold on probabilities for binary and multilabel ``bacc``.
    Returns:
        {metric name: value}; see the module docstring.
    Raises:
        ValueError: unknown task or shapes that do not match it.
    """
    from sklearn.metrics import cohen_kappa_score

    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    out: dict[str, float] = {}
    if task == "binary":
        p = p.reshape(-1)
        if y.shape != p.shape:
            raise ValueError(f"binary task: y_true {y.shape} and probs {p.shape} must both be (n,)")
        out["auroc"], out["auprc"] = _binary_scores(y.astype(int), p)
        out["bacc"] = _bacc(y.astype(int), (p >= threshold).astype(int))
    elif task == "multiclass":
        if p.ndim != 2 or p.shape[0] != y.shape[0] or p.shape[1] != len(class_names):
            raise ValueError(f"multiclass task: probs must be (n, {len(class_names)}), got {p.shape}")
        y = y.astype(int)
        for c, name in enumerate(class_names):
            out[f"auroc/{name}"], out[f"auprc/{name}"] = _binary_scores((y == c).astype(int), p[:, c])
        out["auroc"] = _nanmean([out[f"auroc/{n}"] for n in class_names])
        out["auprc"] = _nanmean([out[f"auprc/{n}"] for n in class_names])
        pred = p.argmax(1)
        out["bacc"] = _bacc(y, pred)
        if ordinal:
            out["qwk"] = float(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(len(class_names)))))
    elif task == "multilabel":
        if p.shape != y.shape or p.ndim != 2 or p.shape[1] != len(class_names):
            raise ValueError(f"multilabel task: y_true and probs must be (n, {len(class_names)}), got "
                             f"{y.shape} and {p.shape}")
        y = y.astype(int)
        for j, name in enumerate(class_names):
            out[f"auroc/{name}"], out[f"auprc/{name}"] = _binary_scores(y[:, j], p[:, j])
            out[f"bacc/{name}"] = _bacc(y[:, j], (p[:, j] >= threshold).astype(int))
        for m in ("auroc", "auprc", "bacc"):
            out[m] = _nanmean([out[f"{m}/{n}"] for n in class_names])
    else:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASK_TYPES)}")
    undefined = sorted(k for k, v in out.items() if np.isnan(v))
    if undefined:
        log.warning("metrics undefined on this set (a class has no positive or no negative example): %s",
                    ", ".join(undefined))
    return out


MAIN_METRICS = ("auroc", "auprc", "bacc", "qwk")
