"""The ``clean_reports`` job (``gigapath reports clean CONFIG`` or ``gigapath run CONFIG`` with
``job: clean_reports``): clean every report of a CSV with one or more ``report_cleaner`` plugins in order, and
write the record.

Outputs (``OUT`` = the job's output folder)::

    OUT/reports_cleaned.csv   the input CSV with its report column cleaned, plus ``cleaning_status`` (ok/failed);
                              a pairs CSV for the clip job (use it with report_cleaner: null)
    OUT/record.csv            row, the input's id columns, raw, cleaned, tokens_raw, tokens_cleaned, status,
                              reason, cached
    OUT/token_lengths.png     histograms of tokens per report before/after (Supplementary Fig. 10)
    OUT/summary.json          counts, requests sent, cache hits, token statistics, cleaners, tokenizer
    OUT/llm_cache/            the LLM answers cache (default ``cache_dir`` of cleaners that have one)

A report a cleaner fails on keeps its text (the next cleaners still run on it), gets ``status: failed`` with
the reason, and makes the exit code 1; re-running the same command asks the server only for those.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import StageConfig, Strict, parse_model, resolve_output
from ..errors import ConfigError
from ..progress import console
from ..store import write_bytes, write_json

log = logging.getLogger("gigapath")
#: cleaner parameters holding a path (resolved against the config's folder)
PATH_PARAMS = ("exemplars", "cache_dir")


class CleanReportsConfig(Strict):
    """``job: clean_reports``."""

    job: Literal["clean_reports"] = "clean_reports"
    output: str | None = Field(None, description="output folder (or --out)")
    registry: list[str] = Field(default_factory=list, description="extra registry.yaml files")
    reports: str = Field(..., description="CSV with one report per row")
    column: str = Field("report", description="the report column")
    id_columns: list[str] | None = Field(
        None, description="columns copied into record.csv (default: slide_id/report_id/id/case_id when present)"
    )
    cleaners: list[StageConfig] = Field(
        default_factory=lambda: [StageConfig(name="rules")], min_length=1,
        description="report_cleaner stages applied in order (e.g. llm then rules)",
    )
    tokenizer: str = Field("minilm-l6", description="token counts: text_encoder preset, tokenizer folder, or 'words'")
    plot: bool = Field(True, description="write token_lengths.png")


def resolve_cleaner_paths(params: dict, base: Path) -> dict:
    """Copy of a cleaner's params with relative ``exemplars``/``cache_dir`` made absolute against ``base``."""
    out = dict(params)
    for key in PATH_PARAMS:
        v = out.get(key)
        if isinstance(v, str) and v and not v.startswith("~") and not Path(v).is_absolute():
            out[key] = str((base / v).resolve())
    return out


def run_clean_reports(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """Run the job; returns 0, or 1 if some report failed to clean (recorded). Raises ConfigError first.

    Options: ``show_prompt`` (print the chat messages an LLM cleaner would send for the first report, then stop).
    """
    from ..api import build, resolve, validate_stage
    from .exemplars import read_reports
    from .record import plot_token_lengths, summarize, token_counter, write_record

    cfg = parse_model(CleanReportsConfig, raw)
    resolve_output(cfg, base, out)
    reports_path = Path(cfg.reports) if Path(cfg.reports).is_absolute() else (base / cfg.reports).resolve()
    outp = Path(cfg.output)
    registry = [str((base / r).resolve()) for r in cfg.registry]
    stages = []
    for i, st in enumerate(cfg.cleaners):
        params = resolve_cleaner_paths(st.params, base)
        validate_stage("report_cleaner", st.name, params, registry, f"cleaners[{i}]")
        info, card = resolve("report_cleaner", st.name, registry)
        given = {**(card.params if card else {}), **params}
        if "cache_dir" in info.cls.Params.model_fields and "cache_dir" not in given:
            params["cache_dir"] = str(outp / "llm_cache")  # the answers cache lives with the outputs
        try:  # built now: a plugin's own checks (exemplars file, API key variable, host) fail before any work
            cleaner = build("report_cleaner", st.name, registry=registry, **params)
        except ConfigError as err:
            key = err.key_path.replace("report_cleaner.", f"cleaners[{i}].", 1)
            raise ConfigError(key, str(err)[len(err.key_path) + 2 :] if err.key_path else str(err)) from None
        stages.append((st.name, params, cleaner))
    rows, raw_texts = read_reports(reports_path, cfg.column)
    ids = cfg.id_columns if cfg.id_columns is not None else [
        c for c in ("slide_id", "report_id", "id", "case_id") if c in rows[0]]
    missing = [c for c in ids if c not in rows[0]]
    if missing:
        raise ConfigError("id_columns", f"{reports_path} has no column(s) {', '.join(missing)}")
    if options.get("show_prompt"):  # what would be sent for the first report; nothing is sent, nothing written
        import json

        for name, _, cleaner in stages:
            if hasattr(cleaner, "prompt"):
                console.print(f"{name}: {cleaner.describe_endpoint()}; messages for row 0 of {reports_path.name}:")
                print(json.dumps(cleaner.prompt.messages(raw_texts[0]), indent=2, ensure_ascii=False))
        return 0
    count = token_counter(cfg.tokenizer, registry)  # fails early if the tokenizer is missing
    outp.mkdir(parents=True, exist_ok=True)

    texts = list(raw_texts)
    status, reasons, cached = ["ok"] * len(texts), [[] for _ in texts], [False] * len(texts)
    stats: dict[str, dict] = {}
    for i, (name, params, cleaner) in enumerate(stages):
        if hasattr(cleaner, "describe_endpoint"):
            console.print(f"cleaner {i + 1}/{len(stages)}: {name} -> {cleaner.describe_endpoint()}")
        results = cleaner.clean_all(texts)
        for j, res in enumerate(results):
            texts[j] = res.text
            cached[j] = cached[j] or res.cached
            if res.status != "ok":
                status[j] = "failed"
                reasons[j].append(f"{name}: {res.reason}")
        stats[name] = dict(getattr(cleaner, "stats", {}))

    before, after = [count(t) for t in raw_texts], [count(t) for t in texts]
    record = [
        {**{c: r.get(c, "") for c in ids}, "row": j, "raw": raw_texts[j], "cleaned": texts[j], "tokens_raw": before[j],
         "tokens_cleaned": after[j], "status": status[j], "reason": "; ".join(reasons[j]),
         "cached": int(cached[j])}
        for j, r in enumerate(rows)
    ]
    write_record(outp / "record.csv", record, ids)
    _write_cleaned_csv(outp / "reports_cleaned.csv", rows, cfg.column, texts, status)
    summary = {
        "reports": str(reports_path), "n_reports": len(rows), "n_failed": status.count("failed"),
        "cleaners": [{"name": n, "params": {k: v for k, v in p.items() if k != "api_key"}} for n, p, _ in stages],
        "cleaner_stats": stats, "tokenizer": cfg.tokenizer, "tokens": summarize(before, after),
    }
    write_json(outp / "summary.json", summary)
    if cfg.plot:
        plot_token_lengths(outp / "token_lengths.png", before, after, tokenizer=cfg.tokenizer,
                           title=f"{len(rows)} reports, cleaners: {' -> '.join(n for n, _, _ in stages)}")
    t = summary["tokens"]
    console.print(
        f"{len(rows)} reports: {len(rows) - summary['n_failed']} cleaned, {summary['n_failed']} failed; median tokens "
        f"{t['before'].get('median', 0):g} -> {t['after'].get('median', 0):g} ({cfg.tokenizer}) -> {outp}"
    )
    if summary["n_failed"]:
        console.print("[red]some reports were left uncleaned[/] (see status/reason in record.csv); re-run the same "
                      "command to retry only those")
    return 1 if summary["n_failed"] else 0


def _write_cleaned_csv(path: Path, rows: list[dict], column: str, texts: list[str], status: list[str]) -> None:
    buf = io.StringIO()
    fields = list(rows[0]) + (["cleaning_status"] if "cleaning_status" not in rows[0] else [])
    w = csv.DictWriter(buf, fields)
    w.writeheader()
    for r, t, s in zip(rows, texts, status):
        w.writerow({**r, column: t, "cleaning_status": s})
    write_bytes(path, buf.getvalue().encode("utf-8"))
