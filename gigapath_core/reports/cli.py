"""``gigapath reports exemplars REPORTS.csv --k 4 --out FILE`` and ``gigapath reports clean CONFIG``."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_reports_parser(sub) -> None:
    from ..cli import config_arguments

    rp = sub.add_parser("reports", help="report cleaning before CLIP: k-means exemplars, LLM/rule cleaning + record")
    rsub = rp.add_subparsers(dest="reports_command", required=True)
    ex = rsub.add_parser("exemplars", help="embed reports, k-means, write the report nearest each centre for "
                                           "hand cleaning (the LLM cleaner's in-context examples)")
    ex.add_argument("reports", help="CSV with one report per row")
    ex.add_argument("--k", type=int, default=4, help="clusters = exemplars (4 in the paper)")
    ex.add_argument("--text-encoder", default="minilm-l6", help="text_encoder preset or plugin (e.g. pubmedbert)")
    ex.add_argument("--column", default="report", help="the report column")
    ex.add_argument("--seed", type=int, default=0, help="k-means random_state")
    ex.add_argument("--out", required=True, help="exemplars file to write (YAML)")
    ex.set_defaults(func=cmd_exemplars)
    cl = rsub.add_parser("clean", help="run a clean_reports config: cleaned CSV, record.csv, token_lengths.png")
    config_arguments(cl, "YAML config (job: clean_reports may be omitted)")
    cl.add_argument("--show-prompt", action="store_true",
                    help="print the messages an LLM cleaner would send for the first report; send nothing")
    cl.set_defaults(func=cmd_clean)


def cmd_exemplars(args: argparse.Namespace) -> int:
    from ..progress import console
    from .exemplars import choose_exemplars

    sel = choose_exemplars(args.reports, args.out, k=args.k, text_encoder=args.text_encoder, column=args.column,
                           seed=args.seed)
    for c, (i, n) in enumerate(zip(sel.indices.tolist(), sel.sizes.tolist())):
        console.print(f"cluster {c}: {n} reports, exemplar = data row {i}")
    console.print(f"-> {args.out}: write the hand-cleaned text under each `cleaned:`")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from ..config import apply_overrides, load_raw
    from ..errors import ConfigError
    from .job import run_clean_reports

    raw = apply_overrides(load_raw(args.config), list(args.set or []))
    if raw.setdefault("job", "clean_reports") != "clean_reports":
        raise ConfigError("job", f"expected clean_reports (or no job:), got {raw['job']!r}; use gigapath run")
    return run_clean_reports(raw, Path(args.config).resolve().parent, args.out, {"show_prompt": args.show_prompt})
