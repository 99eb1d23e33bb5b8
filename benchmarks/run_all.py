"""Run every benchmark of ``docs/benchmarks.md`` one after the other, then regenerate the table (issue #16.6).

Each benchmark measures gigapath against its bare reference in one process, alternating, and writes
``benchmarks/results/<name>.json`` (machine info and load average included); this script only runs them
serially — never two at once, which would make each other's load — and then runs ``make_table.py``.

Usage::

    python benchmarks/run_all.py                      # all (about 45-55 min on an idle 2-core machine)
    python benchmarks/run_all.py --only tissue tiling # some
    python benchmarks/run_all.py --list               # what would run, with its command line

Before quoting absolute numbers, run it on an otherwise idle machine: it warns when the 1-minute load average
at the start exceeds half the core count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: name -> (script, extra arguments); the JSON goes to benchmarks/results/<name>.json
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "tissue": ("tissue.py", []),
    "tiling": ("tiling.py", ["--size", "20000", "--max-tiles", "600"]),
    "resample": ("resample.py", []),
    "input_path": ("input_path.py", []),
    "input_path_busy": ("input_path.py", ["--workers", "0", "--busy", "1"]),
    "tile_encoder": ("tile_encoder.py", ["--tiles", "96", "--repeats", "5"]),
    "slide_encoder": ("slide_encoder.py", []),
    "whole_slide": ("whole_slide.py", []),
    "finetune_cache": ("finetune_cache.py", []),
}


def command(name: str) -> list[str]:
    script, extra = BENCHMARKS[name]
    return [sys.executable, str(ROOT / "benchmarks" / script), *extra, "--out", str(RESULTS / f"{name}.json")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=None)
    ap.add_argument("--skip", nargs="+", choices=sorted(BENCHMARKS), default=[])
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    missing = [n for n in names if not (ROOT / "benchmarks" / BENCHMARKS[n][0]).exists()]
    if missing:
        print(f"no script for: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.list:
        for n in names:
            print(" ".join(command(n)))
        return 0
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > cores / 2:
        print(f"warning: load average {load:.1f} on {cores} cores: other jobs are running; ratios hold, "
              "absolute times will not", file=sys.stderr)
    env = {**os.environ, "GIGAPATH_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}
    failed = []
    for n in names:
        t0 = time.perf_counter()
        print(f"== {n}: {' '.join(command(n))}", file=sys.stderr, flush=True)
        proc = subprocess.run(command(n), cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        print(f"== {n}: exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if proc.returncode != 0:
            failed.append(n)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_table.py")], cwd=ROOT, check=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
