"""Evaluation of slide-level tasks: patient-grouped folds, metrics (scikit-learn), fold statistics (scipy),
result tables and ROC/PR plots (Xu et al. 2024, Methods: mutation prediction, cancer subtyping: k-fold CV,
AUROC/AUPRC/BACC, mean ± s.e.m., one-sided Wilcoxon)."""

from .folds import Splits, check_splits, make_folds, read_splits, write_splits
from .metrics import compute_metrics
from .statistics import mean_sem, summarise_folds, wilcoxon_greater

__all__ = ["Splits", "check_splits", "compute_metrics", "make_folds", "mean_sem", "read_splits", "summarise_folds",
           "wilcoxon_greater", "write_splits"]
