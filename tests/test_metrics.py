"""Metrics and fold statistics against values worked out by hand (or documented by scikit-learn/scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gigapath_core.evaluation.metrics import compute_metrics
from gigapath_core.evaluation.statistics import mean_sem, summarise_folds, wilcoxon_greater
from gigapath_core.evaluation.tables import ablation_rows


def test_binary_known_values():
    # scikit-learn's documented example: roc_auc_score -> 0.75, average_precision_score -> 0.83.
    # By hand: AP = 0.5 * 1 (recall 0.5 at precision 1) + 0.5 * 2/3 (recall 1 at precision 2/3) = 5/6.
    # Threshold 0.5 predicts [0, 0, 0, 1]: recall 1/2 on positives, 2/2 on negatives -> BACC 0.75.
    m = compute_metrics("binary", np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), ["neg", "pos"])
    assert m["auroc"] == pytest.approx(0.75)
    assert m["auprc"] == pytest.approx(5 / 6)
    assert m["bacc"] == pytest.approx(0.75)


def test_multiclass_macro_is_one_vs_rest_mean():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    logits = rng.normal(size=(30, 3)) + np.eye(3)[y] * 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics("multiclass", y, p, ["a", "b", "c"])
    assert m["auroc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["auroc/b"] == pytest.approx(roc_auc_score(y == 1, p[:, 1]))
    # balanced accuracy = mean per-class recall of the argmax, by hand
    pred = p.argmax(1)
    assert m["bacc"] == pytest.approx(np.mean([(pred[y == c] == c).mean() for c in range(3)]))


def test_multiclass_with_a_class_missing_from_the_fold():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1]])
    m = compute_metrics("multiclass", y, p, ["a", "b", "c"])
    assert math.isnan(m["auroc/c"])
    assert m["auroc"] == pytest.approx((m["auroc/a"] + m["auroc/b"]) / 2)


def test_quadratic_weighted_kappa_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    pred = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    p = np.eye(3)[pred] * 0.8 + 0.1
    # kappa_w = 1 - sum(W * O) / sum(W * E), W_ij = (i - j)^2, O = confusion counts, E = outer(row, col) / n
    O = np.zeros((3, 3))
    for a, b in zip(y, pred):
        O[a, b] += 1
    W = (np.arange(3)[:, None] - np.arange(3)[None, :]) ** 2
    E = np.outer(O.sum(1), O.sum(0)) / O.sum()
    expected = 1 - (W * O).sum() / (W * E).sum()
    m = compute_metrics("multiclass", y, p, ["low", "mid", "high"], ordinal=True)
    assert m["qwk"] == pytest.approx(expected)
    assert "qwk" not in compute_metrics("multiclass", y, p, ["low", "mid", "high"])


def test_multilabel_per_label_and_macro():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    p = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.6, 0.4, 0.3], [0.2, 0.1, 0.4]])
    m = compute_metrics("multilabel", y, p, ["EGFR", "KRAS", "TP53"])
    assert m["auroc/EGFR"] == pytest.approx(1.0)
    assert m["auroc/KRAS"] == pytest.approx(1.0)  # positives 0.8, 0.4 vs negatives 0.2, 0.1
    assert math.isnan(m["auroc/TP53"])  # no positive example: undefined, left out of the macro mean
    assert m["auroc"] == pytest.approx(1.0)
    assert m["bacc/KRAS"] == pytest.approx(0.75)  # threshold 0.5: [0, 1, 0, 0] vs [0, 1, 1, 0]


def test_shape_errors():
    with pytest.raises(ValueError, match="probs must be"):
        compute_metrics("multiclass", np.array([0, 1]), np.array([0.1, 0.9]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("regression", np.array([0, 1]), np.array([0.1, 0.9]), ["a", "b"])


def test_mean_sem_formula():
    v = [0.8, 0.9, 0.85, 0.7, 0.95]
    m, s = mean_sem(v)
    assert m == pytest.approx(sum(v) / 5)
    assert s == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in v) / 4) / math.sqrt(5))
    assert mean_sem([0.5, float("nan"), 0.7])[0] == pytest.approx(0.6)
    summary = summarise_folds([{"auroc": 0.8}, {"auroc": 0.9}])
    assert summary["auroc"]["folds"] == [0.8, 0.9] and summary["auroc"]["n"] == 2


def test_wilcoxon_exact_one_sided_p_values():
    # Exact null distribution of W+ for n = 5 (2^5 = 32 equally likely sign patterns):
    # all five differences positive -> W+ = 15, P(W+ >= 15) = 1/32;
    # the smallest one negative -> W+ = 14, P(W+ >= 14) = 2/32 ({1..5} and {2..5}).
    a = [0.90, 0.85, 0.80, 0.95, 0.88]
    b = [0.80, 0.60, 0.50, 0.55, 0.70]  # differences 0.10, 0.25, 0.30, 0.40, 0.18
    assert wilcoxon_greater(a, b)["p"] == pytest.approx(1 / 32)
    b2 = [0.80, 0.60, 0.50, 0.55, 0.93]  # differences 0.10, 0.25, 0.30, 0.40, -0.05 (smallest rank negative)
    assert wilcoxon_greater(a, b2)["p"] == pytest.approx(2 / 32)
    assert wilcoxon_greater(b, a)["p"] == pytest.approx(1.0)  # P(W+ >= 0) = 1
    assert wilcoxon_greater(a, a) == {"statistic": 0.0, "p": 1.0, "n": 0, "mean_diff": 0.0}
    with pytest.raises(ValueError, match="same folds"):
        wilcoxon_greater(a, a[:3])


def test_ablation_table_rows():
    ref = summarise_folds([{"auroc": v} for v in [0.90, 0.85, 0.80, 0.95, 0.88]])
    other = summarise_folds([{"auroc": v} for v in [0.80, 0.60, 0.50, 0.55, 0.70]])
    header, rows, tests = ablation_rows({"longnet": ref, "mean": other}, "longnet", ["auroc"])
    assert header == ["variant", "auroc", "p auroc"]
    assert rows[0][2] == "ref" and rows[1][2] == "0.0312"
    assert rows[1][1] == "0.630 ± 0.054"  # mean 0.63; squared deviations sum 0.058, sd sqrt(0.058/4) / sqrt(5)
    assert tests["mean"]["auroc"]["p"] == pytest.approx(1 / 32)
