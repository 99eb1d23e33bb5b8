"""``gigapath validate CONFIG``: check a config of any job the way ``gigapath run`` does before its first step
(keys, types, plugin and preset names, parameters, paths, inputs), and describe what a run would do, without
running or writing anything (issue #12 item 4).

The checks are the jobs' own config loaders and pre-flights (:func:`gigapath_core.config.load_pipeline_config`,
:func:`gigapath_core.finetune.preflight.prepare_finetune`, :func:`gigapath_core.finetune.ablation.prepare_ablation`,
...), so ``validate`` accepts exactly the configs ``run`` starts and reports the errors ``run`` would report
before its first write. Weights are neither downloaded nor read; a slide file is only checked to exist (opening
it is the run's first step, and a bad slide fails alone there). ``finetune`` and ``ablation`` read the labels and
the tile embeddings, make (or read) the folds, look at the output folder, and build the model with random
weights for one forward pass on one slide, as their run does before writing anything.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _stage(kind: str, stage: Any) -> str:
    if stage is None:
        return ""
    params = ", ".join(f"{k}: {v}" for k, v in sorted(stage.params.items()))
    weights = getattr(stage, "weights", None)
    return (f"{kind} {stage.name}" + (f" {{{params}}}" if params else "")
            + (f" (weights: {weights})" if weights is not None else ""))


def _csv_rows(path: str | Path) -> int | None:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return sum(1 for _ in csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


def _plan_embed(raw: dict, base: Path, out: str | None) -> dict:
    from .config import load_pipeline_config

    cfg, slides = load_pipeline_config(raw, base, out)
    stages = [_stage("tiler", cfg.tiler)] if not cfg.inputs.features else [f"features from {cfg.inputs.features}"]
    stages += [s for s in (_stage("tile_encoder", cfg.tile_encoder), _stage("slide_encoder", cfg.slide_encoder)) if s]
    what = "feature files" if cfg.inputs.features else "slides"
    return {"output": cfg.output, "inputs": f"{len(slides)} {what} (first: {slides[0].slide_id})".replace("1 slides", "1 slide"), "stages": stages}


def _folds(checked) -> str:
    done = checked.splits.k - len(checked.todo)
    return f"{checked.splits.k} folds" + (f" ({done} done by an earlier run)" if done else "")


def _plan_finetune(raw: dict, base: Path, out: str | None) -> dict:
    from .finetune.preflight import prepare_finetune

    checked = prepare_finetune(raw, base, out)  # the run's own pre-flight
    cfg, data = checked.cfg, checked.data
    n = _csv_rows(cfg.data.labels)
    stages = [s for s in (_stage("slide_encoder", cfg.model.slide_encoder), _stage("head", cfg.model.head)) if s]
    return {"output": cfg.output, "inputs": f"{n} labelled rows in {cfg.data.labels} ({len(data.slides)} slides "
            f"used); embeddings {', '.join(cfg.data.embeddings)}", "stages": stages + [_folds(checked)]}


def _plan_ablation(raw: dict, base: Path, out: str | None) -> dict:
    from .finetune.ablation import prepare_ablation

    cfg, variants, checked = prepare_ablation(raw, base, out)  # the run's own pre-flight
    return {"output": cfg.output, "inputs": f"{len(variants)} variants of one finetune config",
            "stages": [f"variant {name}: " + ", ".join(s for s in (_stage("slide_encoder", v.model.slide_encoder),
                                                                    _stage("head", v.model.head)) if s)
                       + f", {_folds(checked[name])}" for name, v in variants.items()]}


def _plan_pretrain(raw: dict, base: Path, out: str | None) -> dict:
    from .config import collect_slides
    from .pretrain.config import load_job_config

    cfg = load_job_config(raw, base, out)
    inputs = []
    if getattr(cfg, "inputs", None) is not None:
        inputs.append(f"{len(collect_slides(cfg.inputs, base))} slides")
    emb = getattr(cfg, "embeddings", None)
    if emb is not None:
        inputs.append("tile embeddings from " + (emb.dir or ", ".join(emb.files) if emb.embed is None
                                                 else "an embed job run first"))
    for key in ("pairs", "labels", "clip"):
        if getattr(cfg, key, None):
            n = _csv_rows(getattr(cfg, key)) if key != "clip" else None
            inputs.append(f"{key}: {getattr(cfg, key)}" + (f" ({n} rows)" if n is not None else ""))
    objective = getattr(cfg, "objective", None)
    stages = [_stage("objective", objective)] if objective is not None else []
    train = getattr(cfg, "train", None)
    if train is not None:
        stages.append(f"train: max_steps {train.max_steps}, epochs {train.epochs}, device {train.device}")
    return {"output": cfg.output, "inputs": "; ".join(inputs), "stages": stages}


def _plan_clean_reports(raw: dict, base: Path, out: str | None) -> dict:
    from .api import validate_stage
    from .config import parse_model, resolve_output
    from .reports.job import CleanReportsConfig, resolve_cleaner_paths

    cfg = parse_model(CleanReportsConfig, raw)
    resolve_output(cfg, base, out)
    reports = Path(cfg.reports) if Path(cfg.reports).is_absolute() else (base / cfg.reports).resolve()
    if not reports.is_file():
        raise ConfigError("reports", f"not found: {reports}")
    registry = [str((base / r).resolve()) for r in cfg.registry]
    for i, st in enumerate(cfg.cleaners):
        validate_stage("report_cleaner", st.name, resolve_cleaner_paths(st.params, base), registry, f"cleaners[{i}]")
    return {"output": cfg.output, "inputs": f"{_csv_rows(reports)} reports in {reports}",
            "stages": [_stage("cleaner", st) for st in cfg.cleaners]}


PLANNERS = {"embed": _plan_embed, "finetune": _plan_finetune, "ablation": _plan_ablation,
            "dinov2": _plan_pretrain, "mae_slide": _plan_pretrain, "clip": _plan_pretrain, "zeroshot": _plan_pretrain,
            "clean_reports": _plan_clean_reports}


def validate(config: str | Path | dict, out: str | None = None, sets: list[str] = ()) -> dict:
    """Check ``config`` (a YAML path or a mapping, with ``--set`` overrides) as ``run`` would, and return the
    plan: ``{"job", "output", "inputs", "stages"}``. Nothing is run or written.

    Raises:
        ConfigError: every problem found (:class:`~gigapath_core.errors.ConfigErrors` for several), with key
            paths and "did you mean" suggestions for misspelt keys and names.
    """
    from .jobs import load_job

    raw, base, job = load_job(config, sets)
    planner = PLANNERS.get(job)
    if planner is None:  # a job registered by a plugin without a planner: its run would check it
        raise ConfigError("job", f"job {job!r} has no validate-only check; run it to check its config")
    return {"job": job, **planner(raw, base, out)}


def format_plan(plan: dict) -> str:
    """The plan as a few lines for the terminal."""
    lines = [f"config OK: job {plan['job']}", f"  inputs: {plan['inputs']}"]
    lines += ["  stages:"] + [f"    {s}" for s in plan["stages"]]
    lines += [f"  output: {plan['output']}", "nothing was run or written (gigapath run CONFIG starts it)"]
    return "\n".join(lines)
