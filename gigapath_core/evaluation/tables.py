"""Result tables: one run's metrics (mean ± s.e.m. and per-fold values) and the side-by-side ablation table with
one-sided Wilcoxon p-values, as Markdown, CSV and a rich table on the console."""

from __future__ import annotations

import csv
import io
from typing import Sequence

from .statistics import format_mean_sem, format_p, wilcoxon_greater


def order_metrics(names: Sequence[str]) -> list[str]:
    """Main metrics first (auroc, auprc, bacc, qwk), then per-class ones, each group alphabetically."""
    main = [m for m in ("auroc", "auprc", "bacc", "qwk") if m in names]
    return main + sorted(n for n in names if n not in main)


def results_rows(summary: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """One run: header and rows ``metric, mean ± s.e.m., mean, sem, fold_0 ... fold_k-1``."""
    k = max((len(v["folds"]) for v in summary.values()), default=0)
    header = ["metric", "mean ± s.e.m.", "mean", "sem"] + [f"fold_{i}" for i in range(k)]
    rows = []
    for name in order_metrics(list(summary)):
        v = summary[name]
        rows.append([name, format_mean_sem(v["mean"], v["sem"]), f"{v['mean']:.6f}", f"{v['sem']:.6f}"]
                    + [f"{x:.6f}" for x in v["folds"]])
    return header, rows


def ablation_rows(summaries: dict[str, dict[str, dict]], reference: str, metrics: Sequence[str]
                  ) -> tuple[list[str], list[list[str]], dict[str, dict[str, dict]]]:
    """Side-by-side table of variants.

    Args:
        summaries: variant -> its :func:`summarise_folds` result (all on the same folds).
        reference: the variant every other one is compared with (H1: reference is better).
        metrics: metric names (columns).
    Returns:
        (header, rows, tests): rows ``variant, <metric> (mean ± s.e.m.), p <metric>, ...``; ``tests`` holds the
        :func:`wilcoxon_greater` result of reference vs variant per metric (``"ref"`` in the table for the
        reference itself).
    """
    header = ["variant"]
    for m in metrics:
        header += [m, f"p {m}"]
    rows, tests = [], {}
    for variant, summary in summaries.items():
        row = [variant]
        for m in metrics:
            v = summary.get(m)
            row.append(format_mean_sem(v["mean"], v["sem"]) if v else "n/a")
            if variant == reference:
                row.append("ref")
                continue
            ref = summaries[reference].get(m)
            if not (v and ref):
                row.append("n/a")
                continue
            t = wilcoxon_greater(ref["folds"], v["folds"])
            tests.setdefault(variant, {})[m] = t
            row.append(format_p(t["p"]))
        rows.append(row)
    return header, rows, tests


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def print_table(title: str, header: list[str], rows: list[list[str]], caption: str = "") -> None:
    """Print on the console (stderr) with rich; cells are never wrapped (the table may be wider than 80 columns)."""
    from rich.measure import Measurement
    from rich.table import Column, Table

    from ..progress import console

    table = Table(*(Column(h, no_wrap=True) for h in header), title=title)
    for r in rows:
        table.add_row(*r)
    width = max(console.width, Measurement.get(console, console.options.update(width=1000), table).maximum)
    saved = console.width
    console.width = width  # rich caps print(width=...) at the console width
    try:
        console.print(table)
        if caption:
            console.print(caption)
    finally:
        console.width = saved
