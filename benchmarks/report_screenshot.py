"""Screenshot of a run's ``report.html`` in headless Chromium: proof that the page renders in a real browser,
offline, with every slide's row (issue #13.3).

Install Chromium once (Debian/Ubuntu, as root): ``apt-get update && apt-get install -y chromium``.

Usage::

    python benchmarks/report_screenshot.py out/stain_task/embed                 # -> out/stain_task/embed/report.png
    python benchmarks/report_screenshot.py OUT/report.html --png shot.png --size 1400,900

Writes ``report.html`` first if the folder has none (``gigapath report``). Chromium runs with no network
(``--disable-background-networking``), no GPU, no sandbox (containers run as root) and a throw-away profile.
Exit code 0 when the PNG was written; the PNG's size is printed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "headless_shell")


def find_browser() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def screenshot(html: Path, png: Path, size: str = "1400,900", timeout: float = 120.0) -> Path:
    """Render ``html`` to ``png`` with headless Chromium. Raises RuntimeError if no browser or no PNG."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found; install it with: apt-get update && apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gigapath-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
               f"--window-size={size}", html.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="a run's output folder or its report.html")
    p.add_argument("--png", help="output PNG (default: report.png beside report.html)")
    p.add_argument("--size", default="1400,900", help="window size W,H in px (default 1400,900)")
    args = p.parse_args(argv)
    target = Path(args.target)
    html = target if target.suffix == ".html" else target / "report.html"
    if not html.is_file():
        from gigapath_core.report import write_run_report

        html = write_run_report(target)
    png = Path(args.png) if args.png else html.with_suffix(".png")
    try:
        screenshot(html, png, args.size)
    except RuntimeError as err:
        print(f"report_screenshot: {err}", file=sys.stderr)
        return 1
    from PIL import Image

    with Image.open(png) as im:
        print(f"{png} {im.width}x{im.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
