"""Jobs a config can declare with ``job:`` and the :func:`run` entry point behind ``gigapath run``.

``embed`` (default): slides -> tiles -> tile embeddings -> slide embedding. Other jobs (fine-tuning,
self-supervised training, zero-shot...) register a runner in :data:`JOBS` as ``"module:function"`` taking
``(raw_config: dict, base: Path, out: str | None, options: dict) -> int`` (the exit code).
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from .config import apply_overrides, load_pipeline_config, load_raw
from .errors import ConfigError

log = logging.getLogger("gigapath")

JOBS: dict[str, str] = {"embed": "gigapath_core.jobs:run_embed"}


def run(config: str | Path | dict, out: str | None = None, sets: list[str] = (), **options: Any) -> int:
    """Validate and run a config. Returns the exit code (0 = every slide/step succeeded).

    Args:
        config: path of a YAML config, or an already-parsed mapping (paths then relative to the cwd).
        out: output folder overriding the config's ``output``.
        sets: ``key.path=value`` overrides.
        options: job options from the command line (e.g. ``executor``, ``shard``).
    Raises:
        ConfigError: the config is invalid (raised before any work).
    """
    if isinstance(config, dict):
        raw, base = dict(config), Path.cwd()
    else:
        raw, base = load_raw(config), Path(config).resolve().parent
    raw = apply_overrides(raw, list(sets))
    job = raw.get("job", "embed")
    if job not in JOBS:
        raise ConfigError("job", f"unknown job {job!r}; valid choices: {', '.join(sorted(JOBS))}")
    module, func = JOBS[job].split(":")
    return getattr(importlib.import_module(module), func)(raw, base, out, options)


def run_embed(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """The ``embed`` job over every slide of the config; writes the output contract and ``manifest.csv``."""
    from .executors import get_executor
    from .pipeline import get_models, process_slide
    from .progress import console, make_progress
    from .store import rebuild_manifest

    if options.get("executor"):
        raw.setdefault("executor", {})["name"] = options["executor"]
    cfg, slides = load_pipeline_config(raw, base, out)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    models = get_models(cfg)  # builds and checks the models before any slide is touched
    for label, m in (("tile encoder", models.tile_encoder), ("slide encoder", models.slide_encoder)):
        if m is not None:
            state = "RANDOM weights (not pretrained)" if m.weights_source == "random" else f"pretrained weights from {m.weights_source}"
            console.print(f"{label}: [bold]{type(m).name}[/] with {state}")
    executor = get_executor(cfg.executor.name, **cfg.executor.params)
    ids = [s.slide_id for s in slides]
    overlay: dict[str, dict] = {}
    failed = 0
    with make_progress() as progress:
        task = progress.add_task("slides", total=len(slides))
        tiles_task = progress.add_task("tiles", total=None, visible=cfg.tile_encoder is not None)

        def on_tiles(done: int, total: int) -> None:
            progress.update(tiles_task, completed=done, total=total)

        try:
            for row in executor.map(process_slide, cfg, slides, on_tiles=on_tiles):
                overlay[row["slide_id"]] = row
                failed += row["status"] == "failed"
                if row["status"] == "failed":
                    console.print(f"[red]failed[/] {row['slide_id']}: {row['reason']}")
                progress.advance(task)
                _write_manifest(cfg.output, ids, overlay)
        finally:
            executor.close()
    rows = _write_manifest(cfg.output, ids, overlay)
    ok = sum(r["status"] == "ok" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    console.print(f"{ok} ok, {skipped} skipped, {failed} failed -> {Path(cfg.output) / 'manifest.csv'}")
    return 1 if failed else 0


def _write_manifest(out_dir: str, ids: list[str], overlay: dict[str, dict]) -> list[dict]:
    """manifest.csv from the markers, with this run's 'skipped' status overlaid."""
    from .store import rebuild_manifest

    rows = rebuild_manifest(out_dir, ids, {sid: r for sid, r in overlay.items() if r["status"] == "skipped"})
    return rows
