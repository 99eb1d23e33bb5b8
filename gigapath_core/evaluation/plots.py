"""ROC and precision-recall curve plots (matplotlib, Agg backend: no display needed).

Binary tasks: one curve per fold (test split). Multiclass (one-vs-rest) and multilabel tasks: one curve per
class/label over the pooled out-of-fold test predictions. Curves come from scikit-learn's ``roc_curve`` and
``precision_recall_curve``; the legend gives each curve's AUROC / average precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .predictions import to_arrays


def _curves(task: str, class_names: Sequence[str], rows: list[dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(legend name, binary targets, scores) per curve."""
    if task == "binary":
        out = []
        for fold in sorted({int(r["fold"]) for r in rows}):
            y, p = to_arrays([r for r in rows if int(r["fold"]) == fold], task, class_names)
            out.append((f"fold_{fold}", y, p))  # as the fold folders
        return out
    y, p = to_arrays(rows, task, class_names)
    if task == "multiclass":
        return [(name, (y == c).astype(int), p[:, c]) for c, name in enumerate(class_names)]
    return [(name, y[:, j], p[:, j]) for j, name in enumerate(class_names)]


def plot_curves(rows: list[dict], task: str, class_names: Sequence[str], out_dir: str | Path,
                title: str = "") -> list[Path]:
    """Write ``roc.png`` and ``pr.png`` into ``out_dir`` from test-split prediction rows; returns the paths.

    Curves whose targets hold a single class are skipped (undefined).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    from ..store import atomic_path

    curves = [c for c in _curves(task, class_names, rows) if len(np.unique(c[1])) == 2]
    out_dir = Path(out_dir)
    paths = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
        for name, y, p in curves:
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, p):.3f})")
            else:
                prec, rec, _ = precision_recall_curve(y, p)
                ax.step(rec, prec, where="post", label=f"{name} (AP {average_precision_score(y, p):.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC {title}".strip())
        else:
            ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall {title}".strip())
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        if curves:
            ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{kind}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths
