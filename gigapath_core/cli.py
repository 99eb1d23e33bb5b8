"""``gigapath`` console script: run, validate, plugins, presets, doctor, export, heatmap, report, reports."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from .errors import GigapathError


# Libraries whose own log lines are about a file being read, not about the run: tifffile ("invalid page offset"),
# libvips through pyvips ("VIPS: bad number, line 1, column 3" when it sniffs a CSV). Each reader's failure is
# recorded with the slide (manifest reason, console line), so these lines are shown only with -v, labelled.
LIBRARY_LOGGERS = ("tifffile", "pyvips")


class _LibraryLines(logging.Filter):
    """Drops the log records of :data:`LIBRARY_LOGGERS` from the console, or with ``-v`` shows them as DEBUG
    lines prefixed with the library's name."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in LIBRARY_LOGGERS:
            return True
        if not self.verbose:
            return False
        record.msg, record.args = f"{record.name}: {record.getMessage()}", None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from .progress import console

    handler = RichHandler(console=console, show_path=False, show_time=False)
    handler.addFilter(_LibraryLines(verbose))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler])
    # pyvips forwards libvips' GLib log (~20 "INFO VIPS: ..." lines per slide) to its logger "pyvips"
    for noisy in ("PIL", "h5py", "matplotlib", "urllib3", "filelock", "httpx", "huggingface_hub", "pyvips"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args) -> int:
    from .jobs import run

    options = {k: v for k, v in (("executor", args.executor), ("shard", args.shard), ("address", args.address)) if v}
    return run(args.config, out=args.out, sets=args.set or [], **options)


def cmd_validate(args) -> int:
    from .validate import format_plan, validate

    plan = validate(args.config, out=args.out, sets=args.set or [])
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def cmd_plugins(args) -> int:
    from .api import list_plugins

    rows = list_plugins(args.kind)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    from .progress import console

    table = Table("kind", "name", "package", "description")
    for r in rows:
        table.add_row(r["kind"], r["name"], r["package"], r["description"])
    console.print(table, soft_wrap=True) if sys.stdout.isatty() else _plain(rows, ["kind", "name", "package", "description"])
    return 0


def _plain(rows, cols) -> None:
    """Tab-separated, with a header row (for scripts: ``--json`` gives the same rows as JSON)."""
    print("\t".join(cols))
    for r in rows:
        print("\t".join(str(r[c]) for c in cols))


def cmd_presets(args) -> int:
    from .api import list_presets

    if args.markdown:  # docs/zoo.md: every card as tables (dim, params, mpp, licence, gated, source)
        from .zoo import presets_markdown

        print(presets_markdown(), end="")
        return 0
    rows = list_presets()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _plain([{"name": r["name"], "licence": r["licence"],
             "components": ", ".join(f"{k}={v['plugin']}" + (f" ({v['embed_dim']}-d)" if v.get("embed_dim") else "")
                                     for k, v in r["components"].items())} for r in rows],
           ["name", "components", "licence"])
    from .zoo import legend

    markers = legend(" ".join(r["licence"] for r in rows))
    if markers:  # on stderr: the terminal shows it under the table, a redirected table stays tab-separated
        print(f"markers: {markers}; every card's sources: gigapath presets --markdown (docs/zoo.md)",
              file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    from .doctor import report

    info = report()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for section, items in info.items():
            print(f"[{section}]")
            for k, v in (items.items() if isinstance(items, dict) else enumerate(items)):
                if isinstance(v, dict):  # slide readers: package and whether it can open files here
                    v = ", ".join(f"{a}: {b}" for a, b in v.items())
                print(f"  {k}: {v}")
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    res = export_run(args.out, args.format, args.dest, cohort=args.cohort, encoder=args.encoder)
    print(res.summary())
    return 1 if any(r["status"] == "refused" for r in res.not_exported) else 0  # slides failed in the run: 0


def _load_classes(path: str | None) -> dict | None:
    """Zero-shot classes from a YAML file: ``{label: [synonyms]}``, or a zeroshot/clip config's
    ``zeroshot.classes``. Raises ConfigError if the file has neither."""
    if path is None:
        return None
    from .config import load_raw
    from .errors import ConfigError

    raw = load_raw(path)
    classes = raw.get("zeroshot", {}).get("classes") if isinstance(raw.get("zeroshot"), dict) else raw
    if not isinstance(classes, dict) or not classes:
        raise ConfigError("--classes", f"{path} holds no classes (label: [synonyms], or zeroshot.classes)")
    return {str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in classes.items()}


def cmd_heatmap(args) -> int:
    from .heatmap.job import run_heatmaps
    from .report import write_run_report

    fold = args.fold if args.fold == "all" else int(args.fold)
    index = run_heatmaps(args.embed_dir, args.out, model=args.model, folds=fold, clip=args.clip,
                         classes=_load_classes(args.classes), size=args.size, top_k=args.top_k, smooth=args.smooth,
                         scale=args.scale, slides=args.slides)
    write_run_report(args.embed_dir)
    return 1 if any(e["status"] == "failed" for e in index["slides"].values()) else 0


def cmd_report(args) -> int:
    from .errors import ConfigError
    from .report import write_run_report

    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():  # the user's path: one plain line, no traceback hint (main's OSError branch adds one)
        raise ConfigError("OUT_DIR", f"{'not a folder' if out_dir.exists() else 'no such folder'}: {out_dir}")
    print(write_run_report(out_dir))
    return 0


def config_arguments(p: argparse.ArgumentParser, config_help: str = "config (YAML)") -> None:
    """CONFIG, --out and --set: the arguments of every command that takes a config (``run``, ``validate``,
    ``reports clean``)."""
    p.add_argument("config", help=config_help)
    p.add_argument("--out", help="output folder (overrides the config's output)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    from .jobs import JOBS

    p = argparse.ArgumentParser(
        prog="gigapath", description="Prov-GigaPath whole-slide pipelines, plugin by plugin.",
        epilog=f"jobs a config declares with `job:` (run with `gigapath run CONFIG`): {', '.join(sorted(JOBS))}; "
               "without `job:` a config is an embed job. Docs: README.md and docs/.")
    p.add_argument("--version", action="version", version=f"gigapath {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failed slides)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help=f"validate and run a YAML config (jobs: {', '.join(sorted(JOBS))})")
    config_arguments(r)
    r.add_argument("--executor", help="executor name: local or ray (default: the config's, else local)")
    r.add_argument("--shard", help="k/N with 0 <= k < N: process only slides k, k+N, k+2N, ... (Slurm job arrays)")
    r.add_argument("--address", help="Ray cluster to join ('auto' = the one started on this machine); "
                                     "implies --executor ray")
    r.set_defaults(func=cmd_run)

    v = sub.add_parser("validate", help="check a config of any job as `run` would (keys, plugins, params, paths, "
                                        "inputs) and print the plan; runs and writes nothing; exit 0 or 2")
    config_arguments(v)
    v.add_argument("--json", action="store_true", help="the plan as JSON")
    v.set_defaults(func=cmd_validate)

    pl = sub.add_parser("plugins", help="list installed plugins")
    pl.add_argument("--kind", help="only this kind")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    pr = sub.add_parser("presets", help="list presets (model cards) from the registry")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--markdown", action="store_true", help="the model-zoo tables of docs/zoo.md")
    pr.set_defaults(func=cmd_presets)

    from .export import FORMATS

    ex = sub.add_parser("export", help="write a finished run's tile features for TRIDENT, CLAM, STAMP, "
                                       "prov-gigapath or AnnData (docs/formats.md)")
    ex.add_argument("out", help="finished run folder (the run's --out)")
    ex.add_argument("--format", required=True, choices=list(FORMATS))
    ex.add_argument("--dest", help="output folder (default: OUT/export/<format>)")
    ex.add_argument("--cohort", action="store_true", help="anndata: one cohort.h5ad instead of one file per slide")
    ex.add_argument("--encoder", help="tile-encoder name for TRIDENT features_<encoder>/ and STAMP 'extractor' "
                                      "(default: gigapath for the Prov-GigaPath tile encoder with its released "
                                      "weights, else the tile_encoder name the run was configured with: the preset "
                                      "name if it used one, e.g. dinov2-vits14, else the plugin name, e.g. "
                                      "dinov2_vit)")
    ex.set_defaults(func=cmd_export)

    h = sub.add_parser("heatmap", help="attention/score heatmaps, top-k tile montages, QuPath GeoJSON and raw "
                                        "per-tile scores for every slide of an embed run")
    h.add_argument("embed_dir", help="output folder of an embed run (<slide_id>/tile_embeddings.h5)")
    h.add_argument("--model", help="finetune output folder (config.yaml + fold_<k>/checkpoints)")
    h.add_argument("--fold", default="all", help="'all' (mean over the fold models, default) or one fold index")
    h.add_argument("--clip", help="clip output folder, for zero-shot heatmaps (instead of --model)")
    h.add_argument("--classes", help="zero-shot classes: YAML label -> synonyms, or a zeroshot config")
    h.add_argument("--out", help="output folder (default EMBED_DIR/heatmaps)")
    h.add_argument("--size", type=int, default=2048, help="long side of the heatmap image in px (default 2048)")
    h.add_argument("--top-k", type=int, default=8, help="tiles per montage row (0 = no montage; default 8)")
    h.add_argument("--smooth", type=float, default=0.0, help="Gaussian smoothing in tile sides (default 0: flat cells)")
    h.add_argument("--scale", default="percentile", choices=["percentile", "ratio"],
                   help="attention colours: percentile rank in the slide (default) or weight x N tiles")
    h.add_argument("--slides", nargs="+", help="only these slide ids")
    h.set_defaults(func=cmd_heatmap)

    rp = sub.add_parser("report", help="(re)write OUT/report.html for an embed, finetune or ablation output folder")
    rp.add_argument("out_dir")
    rp.set_defaults(func=cmd_report)

    d = sub.add_parser("doctor", help="versions, slide readers, torch device, offline weights")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    from .reports.cli import add_reports_parser  # gigapath reports exemplars|clean (issue #15)

    add_reports_parser(sub)
    _verbose_after_the_command(p)
    return p


def _verbose_after_the_command(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` on every subcommand too (``gigapath validate X -v``), at any depth (``reports clean``).
    SUPPRESS as default: a subcommand without ``-v`` keeps the top-level value (``gigapath -v run X``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                child.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                   help="debug logging (tracebacks of failed slides)")
                _verbose_after_the_command(child)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """``parse_args``, with a hint for ``--set key.path value`` (a space instead of ``=``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        hint = ""
        no_eq = [s for s in (getattr(args, "set", None) or []) if "=" not in s]
        if no_eq:
            hint = (f" (--set takes KEY.PATH=VALUE in one word: --set {no_eq[0]}={extra[0]}, "
                    f"not --set {no_eq[0]} {extra[0]})")
        parser.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _setup_logging(args.verbose)
    warnings.simplefilter("default")
    try:
        return args.func(args)
    except GigapathError as err:
        from .errors import ConfigErrors

        for one in err.errors if isinstance(err, ConfigErrors) else [err]:  # several config errors: one line each
            print(f"gigapath: error: {one}", file=sys.stderr)
        return 2
    except OSError as err:  # a filesystem error outside any slide (the slides' own are recorded per slide)
        if args.verbose:
            import traceback

            traceback.print_exc()
        hint = "" if args.verbose else " (run with -v for the traceback)"
        print(f"gigapath: error: {err}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gigapath: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
