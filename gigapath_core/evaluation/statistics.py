"""Statistics over folds (Xu et al. 2024, Methods: mutation prediction, cancer subtyping): mean ± standard error of
the mean, and the one-sided Wilcoxon signed-rank
test between two methods evaluated on the same folds (scipy)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_sem(values: Sequence[float]) -> tuple[float, float]:
    """(mean, s.e.m.) of per-fold values, ignoring NaN folds.

    s.e.m. = sample standard deviation (ddof=1) / sqrt(n), as ``scipy.stats.sem``; NaN if fewer than 2 values.
    """
    from scipy.stats import sem

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(sem(v)) if len(v) > 1 else float("nan")


def summarise_folds(per_fold: Sequence[dict[str, float]]) -> dict[str, dict]:
    """Per-fold metric dicts -> ``{metric: {"mean", "sem", "n", "folds": [value per fold]}}`` (NaN folds are kept
    in ``folds`` and left out of mean/s.e.m.; ``n`` counts the folds used)."""
    names: list[str] = []
    for d in per_fold:
        names += [k for k in d if k not in names]
    out = {}
    for name in names:
        vals = [float(d.get(name, float("nan"))) for d in per_fold]
        m, s = mean_sem(vals)
        out[name] = {"mean": m, "sem": s, "n": int(sum(not math.isnan(v) for v in vals)), "folds": vals}
    return out


def wilcoxon_greater(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """One-sided Wilcoxon signed-rank test that method ``a`` is better than ``b`` on paired folds.

    Args:
        a, b: the same metric per fold for the two methods (same folds, same order).
    Returns:
        ``{"statistic", "p", "n", "mean_diff"}``: H1 is median(a - b) > 0 (``scipy.stats.wilcoxon`` with
        ``alternative="greater"``; exact distribution for small n). Folds with NaN in either are dropped;
        zero differences are dropped (scipy's default ``zero_method="wilcox"``); if no difference is left, p = 1
        (no evidence that ``a`` is better) and statistic = 0.
    Raises:
        ValueError: ``a`` and ``b`` differ in length.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired test needs the same folds: {len(x)} vs {len(y)} values")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    mean_diff = float(d.mean()) if len(d) else float("nan")
    if not np.any(d != 0):
        return {"statistic": 0.0, "p": 1.0, "n": 0, "mean_diff": mean_diff}
    res = wilcoxon(x[keep], y[keep], alternative="greater")
    return {"statistic": float(res.statistic), "p": float(res.pvalue), "n": int(np.sum(d != 0)), "mean_diff": mean_diff}


def format_mean_sem(mean: float, sem: float, digits: int = 3) -> str:
    """``0.912 ± 0.010`` (``n/a`` for NaN; no ``±`` part when the s.e.m. is undefined)."""
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(sem) else f"{mean:.{digits}f} ± {sem:.{digits}f}"


def format_p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"
