"""``gigapath`` console script: run, plugins, presets, doctor."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from .errors import GigapathError


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from .progress import console

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    for noisy in ("PIL", "h5py", "matplotlib", "urllib3", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args) -> int:
    from .jobs import run

    options = {k: v for k, v in (("executor", args.executor), ("shard", args.shard), ("address", args.address)) if v}
    return run(args.config, out=args.out, sets=args.set or [], **options)


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
    for r in rows:
        print("\t".join(str(r[c]) for c in cols))


def cmd_presets(args) -> int:
    from .api import list_presets

    rows = list_presets()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        comps = ", ".join(f"{k}={v['plugin']}" + (f" ({v['embed_dim']}-d)" if v.get("embed_dim") else "")
                          for k, v in r["components"].items())
        print(f"{r['name']}\t{comps}\t{r['licence']}")
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
                print(f"  {k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="gigapath", description="Prov-GigaPath whole-slide pipelines, plugin by plugin.")
    p.add_argument("--version", action="version", version=f"gigapath {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of failed slides)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="validate and run a YAML config")
    r.add_argument("config", help="pipeline config (YAML)")
    r.add_argument("--out", help="output folder (overrides the config's output)")
    r.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a config value (repeatable)")
    r.add_argument("--executor", help="executor name: local or ray (default: the config's, else local)")
    r.add_argument("--shard", help="k/N with 0 <= k < N: process only slides k, k+N, k+2N, ... (Slurm job arrays)")
    r.add_argument("--address", help="Ray cluster to join ('auto' = the one started on this machine); "
                                     "implies --executor ray")
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser("plugins", help="list installed plugins")
    pl.add_argument("--kind", help="only this kind")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plugins)

    pr = sub.add_parser("presets", help="list presets (model cards) from the registry")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(func=cmd_presets)

    d = sub.add_parser("doctor", help="versions, slide readers, torch device, offline weights")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    from .reports.cli import add_reports_parser  # gigapath reports exemplars|clean (issue #15)

    add_reports_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    warnings.simplefilter("default")
    try:
        return args.func(args)
    except GigapathError as err:
        print(f"gigapath: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gigapath: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
