"""The before/after record of a cleaning run: raw/cleaned pairs with token counts (CSV), summary statistics and
the token-length histograms before and after cleaning (the paper's Supplementary Fig. 10).

Token counts use a named tokenizer: a ``text_encoder`` preset or plugin name (its own tokenizer, e.g.
``minilm-l6``, offline; ``pubmedbert`` counts what the paper's text tower sees), a tokenizer folder or hub id
(``transformers.AutoTokenizer``), or ``words`` (whitespace-separated words, no model). Counts exclude special
tokens and are not truncated.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import numpy as np

from ..store import write_bytes

RECORD_FIELDS = ["row", "raw", "cleaned", "tokens_raw", "tokens_cleaned", "status", "reason", "cached"]


def token_counter(name: str = "minilm-l6", registry=()) -> Callable[[str], int]:
    """``name`` -> a function text -> number of tokens. Raises WeightsError if the tokenizer is unavailable."""
    if name == "words":
        return lambda text: len(text.split())
    from ..api import build, validate_params
    from ..errors import PluginNotFoundError

    try:
        info, params, _ = validate_params("text_encoder", name, {}, registry, "tokenizer")
    except PluginNotFoundError:
        tok = _auto_tokenizer(name)
    else:  # the encoder's tokenizer, without its weights when the plugin can load it alone
        loader = getattr(info.cls, "load_tokenizer", None)
        tok = loader(**params.model_dump()) if loader else build("text_encoder", name, registry=registry).tokenizer
    tok.model_max_length = 10**9  # count every token; no "longer than the maximum" warning

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False, truncation=False)["input_ids"]) if text else 0

    return count


def _auto_tokenizer(name: str):
    import os

    from transformers import AutoTokenizer

    from ..errors import WeightsError

    try:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        return AutoTokenizer.from_pretrained(name, local_files_only=offline or Path(name).is_dir())
    except Exception as err:
        raise WeightsError(
            f"tokenizer {name!r}: not a text_encoder preset/plugin and not loadable as a tokenizer "
            f"({type(err).__name__}); use a preset such as minilm-l6, a tokenizer folder, or 'words'"
        ) from None


def write_record(path: str | Path, rows: list[dict], extra: list[str] = ()) -> None:
    """Write the record CSV atomically: ``extra`` columns (ids from the input, e.g. slide_id) then
    :data:`RECORD_FIELDS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, [*extra, *RECORD_FIELDS], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_bytes(path, buf.getvalue().encode("utf-8"))


def summarize(before: list[int], after: list[int]) -> dict:
    """Token-length statistics before and after: n, mean, median, p95, max, total and the fraction removed."""

    def stats(x):
        a = np.asarray(x, dtype=np.float64)
        if not len(a):
            return {"n": 0}
        return {"n": int(len(a)), "mean": float(a.mean()), "median": float(np.median(a)),
                "p95": float(np.percentile(a, 95)), "max": int(a.max()), "total": int(a.sum())}

    b, a = stats(before), stats(after)
    removed = 1.0 - a["total"] / b["total"] if b.get("total") else 0.0
    return {"before": b, "after": a, "fraction_of_tokens_removed": removed}


def plot_token_lengths(path: str | Path, before: list[int], after: list[int], title: str = "",
                       tokenizer: str = "") -> None:
    """Overlaid histograms of tokens per report before and after cleaning (shared bins, medians marked),
    written atomically as PNG (or any format matplotlib infers from the suffix)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.add_subplot()
    top = max([*before, *after, 1])
    bins = np.linspace(0, top, min(40, max(5, int(np.sqrt(len(before))) * 3)) + 1)
    for data, label, colour in ((before, "raw", "tab:gray"), (after, "cleaned", "tab:blue")):
        med = float(np.median(data)) if len(data) else 0.0
        ax.hist(data, bins=bins, alpha=0.6, color=colour, label=f"{label} (median {med:g})")
        ax.axvline(med, color=colour, linestyle="--", linewidth=1)
    ax.set_xlabel(f"tokens per report{f' ({tokenizer})' if tokenizer else ''}")
    ax.set_ylabel("reports")
    ax.set_title(title or "Report length before and after cleaning")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png")
    write_bytes(path, buf.getvalue())
