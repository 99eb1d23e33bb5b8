"""Slide-level fine-tuning and evaluation (Xu et al. 2024, Methods: mutation prediction, cancer subtyping): the
``finetune`` and ``ablation`` jobs.

``finetune``: labels CSV + tile embeddings of an embed run -> patient-grouped stratified k-fold training of an
(optional) slide encoder and a task head with the shared Trainer -> predictions, metrics (mean ± s.e.m.),
tables and plots. ``ablation``: several finetune variants on the same folds, compared side by side with
one-sided Wilcoxon signed-rank tests.
"""

from .config import FinetuneConfig, load_finetune_config
from .runner import finetune, run_finetune

__all__ = ["FinetuneConfig", "finetune", "load_finetune_config", "run_finetune"]
