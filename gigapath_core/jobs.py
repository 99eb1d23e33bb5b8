"""Jobs a config can declare with ``job:`` and the :func:`run` entry point behind ``gigapath run``.

``embed`` (default): slides -> tiles -> tile embeddings -> slide embedding. Other jobs (fine-tuning,
self-supervised training, zero-shot...) register a runner in :data:`JOBS` as ``"module:function"`` taking
``(raw_config: dict, base: Path, out: str | None, options: dict) -> int`` (the exit code).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path
from typing import Any

from .api import NO_WEIGHTS
from .config import apply_overrides, load_pipeline_config, load_raw
from .errors import ConfigError
from .report import try_write_run_report

log = logging.getLogger("gigapath")

JOBS: dict[str, str] = {"embed": "gigapath_core.jobs:run_embed"}
JOBS["finetune"] = "gigapath_core.finetune.runner:run_finetune"
JOBS["ablation"] = "gigapath_core.finetune.ablation:run_ablation"
JOBS.update({j: f"gigapath_core.pretrain.jobs:run_{j}" for j in ("dinov2", "mae_slide", "clip", "zeroshot")})
JOBS["clean_reports"] = "gigapath_core.reports.job:run_clean_reports"


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
    raw, base, job = load_job(config, sets)
    module, func = JOBS[job].split(":")
    return getattr(importlib.import_module(module), func)(raw, base, out, options)


def load_job(config: str | Path | dict, sets: list[str] = ()) -> tuple[dict, Path, str]:
    """``(raw mapping with the --set overrides, folder relative paths resolve against, job name)`` of a config
    (a YAML path, or a mapping whose paths resolve against the cwd). Used by ``run`` and ``validate``.

    Raises:
        ConfigError: unreadable YAML, a bad override, or an unknown job (with a "did you mean").
    """
    if isinstance(config, dict):
        raw, base = dict(config), Path.cwd()
    else:
        raw, base = load_raw(config), Path(config).resolve().parent
    raw = apply_overrides(raw, list(sets))
    job = raw.get("job", "embed")
    if job not in JOBS:
        from .suggest import did_you_mean

        raise ConfigError("job", f"unknown job {job!r}; valid choices: {', '.join(sorted(JOBS))}"
                                 f"{did_you_mean(str(job), JOBS)}")
    return raw, base, job


def run_embed(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """The ``embed`` job over every slide of the config; writes the output contract and ``manifest.csv``.

    Options: ``executor`` (name; overrides the config's ``executor.name``; the config's ``executor.params``
    are kept only if the name is the same), ``address`` (Ray cluster to join; implies ``executor: ray``) and
    ``shard`` (``k/N``: only that slice of the slides, manifest written to ``manifest-shard-k-of-N.csv``).
    See docs/scale_out.md.
    """
    import time

    from .executors import get_executor, map_until_done, parse_shard, shard_slides
    from .pipeline import MODEL_STAGES, plan_slide, process_slide
    from .progress import console, make_progress
    from .store import rebuild_manifest, write_manifest
    from .weights import random_weights_said_elsewhere

    if options.get("address"):
        options.setdefault("executor", "ray")
        if options["executor"] != "ray":
            raise ConfigError("--address", f"joins a Ray cluster; it needs --executor ray (got {options['executor']!r})")
    if options.get("executor"):
        ex = raw.setdefault("executor", {})
        if isinstance(ex, dict) and "name" in ex and ex["name"] != options["executor"]:
            if ex.get("params"):
                log.warning("--executor %s: ignoring executor.params meant for %r", options["executor"],
                            ex.get("name", "local"))
            ex["params"] = {}
        ex["name"] = options["executor"]
    if options.get("address"):
        raw["executor"].setdefault("params", {})["address"] = options["address"]
    shard = options.get("shard")
    manifest_name = "manifest.csv"
    if shard:
        k, n = parse_shard(shard)  # checked before the config's slides are globbed
        manifest_name = f"manifest-shard-{k}-of-{n}.csv"
    cfg, all_slides = load_pipeline_config(raw, base, out)
    slides = shard_slides(all_slides, shard)
    executor = get_executor(cfg.executor.name, **cfg.executor.params)
    ids = [s.slide_id for s in slides]
    rows: dict[str, dict] = {}
    done_here: dict[str, dict] = {}  # the rows this run produced
    try:
        # slides finished by an earlier run are skipped here; the models are built (and checked) where slides
        # will run, before any slide is touched, for the stages that some slide left needs: none on a re-run
        # where every slide is done
        plans = {s.slide_id: plan_slide(cfg, s) for s in slides}
        todo = [s for s in slides if plans[s.slide_id][0] is None]
        needs = {stage for s in todo for stage in plans[s.slide_id][1]}
        executor.check_device(cfg)
        described = []
        if todo:
            with random_weights_said_elsewhere():  # said once per model on the line below, not also as a warning
                described = executor.describe_models(cfg, [s for s in MODEL_STAGES if s in needs])
        for label, name, source in described:
            state = ("[bold red]RANDOM weights (not pretrained)[/]" if source == "random"
                     else "no weights (parameter-free)" if source == NO_WEIGHTS
                     else f"pretrained weights from {source}")
            console.print(f"{label}: [bold]{name}[/] with {state}")
        for stage in MODEL_STAGES:
            if getattr(cfg, stage) is not None and stage not in needs:
                console.print(f"{stage.replace('_', ' ')}: [bold]{getattr(cfg, stage).name}[/] not loaded "
                              f"(no slide left to process needs it)")
        if shard:
            console.print(f"shard {shard}: {len(slides)} of {len(all_slides)} slides")
        with output_errors(cfg.output):  # a full disk or a read-only folder: one clear line, exit 2, before any slide
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            rows = {r["slide_id"]: r for r in rebuild_manifest(cfg.output, ids, name=manifest_name)}
        failed, last_write = 0, time.monotonic()
        for s in slides:  # finished by an earlier run: the row it wrote (this_run: skipped)
            if plans[s.slide_id][0] is not None:
                rows[s.slide_id] = done_here[s.slide_id] = plans[s.slide_id][0]
        with make_progress() as progress:
            task = progress.add_task("slides", total=len(slides), completed=len(slides) - len(todo))
            tiles_task = progress.add_task("tiles", total=None,
                                           visible="tile_encoder" in needs and executor.in_process)

            def on_tiles(done: int, total: int) -> None:
                progress.update(tiles_task, completed=done, total=total)

            waiting: list[int] = []

            def on_wait(locked: list[str]) -> None:
                if waiting[-1:] != [len(locked)]:  # say it when the number changes, not every poll
                    console.print(f"waiting for {len(locked)} slide(s) being processed by another run "
                                  f"(e.g. {locked[0]}); their locks are checked every few seconds")
                waiting.append(len(locked))

            for row in map_until_done(executor, process_slide, cfg, todo, on_tiles=on_tiles, on_wait=on_wait):
                row.setdefault("this_run", "processed" if row["status"] == "ok" else row["status"])
                rows[row["slide_id"]] = done_here[row["slide_id"]] = row
                failed += row["status"] == "failed"
                if row["status"] == "failed":
                    console.print(f"[red]failed[/] {row['slide_id']}: {row['reason']}")
                progress.advance(task)
                if time.monotonic() - last_write > 5.0:  # in-memory rows: no re-read of every marker per slide
                    try:
                        write_manifest(cfg.output, [rows[i] for i in ids], manifest_name)
                    except OSError as err:  # e.g. a full disk: the slides go on; the final write says it
                        log.warning("could not update %s: %s", manifest_name, err)
                    last_write = time.monotonic()
    except BaseException:
        executor.close()
        if done_here:  # a run stopped by an error or Ctrl-C: the manifest still tells the truth about finished slides
            try:
                rebuild_manifest(cfg.output, ids, done_here, name=manifest_name)
            except OSError as err:
                log.warning("could not rebuild %s: %s", manifest_name, err)
        raise
    executor.close()
    # the rows of this run win (a failed slide whose marker could not be written); other slides: their markers
    with output_errors(cfg.output):
        final = rebuild_manifest(cfg.output, ids, done_here, name=manifest_name)
    skipped = {r["slide_id"] for r in final if r["this_run"] == "skipped"}
    ok = sum(r["status"] == "ok" and r["this_run"] == "processed" for r in final)
    console.print(f"{ok} ok, {len(skipped)} skipped, {failed} failed -> {Path(cfg.output) / manifest_name}")
    try_write_run_report(cfg.output)  # OUT/report.html
    if shard:
        console.print("when every shard has finished, run the same command without --shard to write manifest.csv "
                      "(it skips finished slides and redoes any that are missing)")
    return 1 if failed else 0


@contextlib.contextmanager
def output_errors(output: str):
    """Turn an OSError while writing the run's own files in OUT (not a slide's) into a one-line ConfigError."""
    try:
        yield
    except OSError as err:
        if Path(output).exists() and not Path(output).is_dir():
            raise ConfigError("output", f"{output} exists and is not a folder") from None
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(output) else ""
        what = err.strerror or err
        raise ConfigError("output", f"cannot write to the output folder {output}{where}: {what}") from None
