"""Runners of the ``dinov2``, ``mae_slide``, ``clip`` and ``zeroshot`` jobs (registered in
:data:`gigapath_core.jobs.JOBS`; signature ``(raw, base, out, options) -> exit code``).

Outputs (``OUT`` = the job's output folder)::

    OUT/objective.json            the objective's plugin name + params (to rebuild it, e.g. for zero-shot)
    OUT/train_log.jsonl           one row per optimiser step (loss and the objective's scalars)
    OUT/checkpoints/step_*/       model.safetensors + state.pt (exact resume: re-run the same command)
    OUT/tile_encoder.safetensors  (dinov2) teacher ViT in timm layout -> tile_encoder weights:
    OUT/slide_encoder.safetensors (mae_slide) encoder in its plugin's layout -> slide_encoder weights:
    OUT/zeroshot.json, OUT/zeroshot_probs.csv   (clip with zeroshot:, zeroshot) metrics and probabilities
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..progress import console
from ..store import write_bytes, write_json
from .config import EmbeddingsConfig, load_job_config
from .data import (
    TileSource,
    ViewDataset,
    embedding_files,
    epoch_batches,
    load_pairs,
    load_slide_embeddings,
    n_batches,
    seeded_step,
)

log = logging.getLogger("gigapath")
OBJECTIVE_FILE = "objective.json"


def build_objective(stage, registry=(), seed: int | None = None):
    """Build the ``ssl_objective`` plugin; with ``seed``, its random initialisation is reproducible."""
    from ..api import build
    from ..training import seed_everything

    if seed is not None:
        seed_everything(seed)
    return build("ssl_objective", stage.name, registry=registry, **stage.params)


def fill_objective_width(stage, slides: dict[str, dict], registry=()) -> None:
    """Fill ``objective.params.slide_encoder_params``' input width (:func:`gigapath_core.widths.fill_input_width`)
    from the tile embeddings ``slides`` when every slide has the same width (else left to the objective's
    own check). Raises ConfigError if a given width disagrees. ``stage`` is changed in place."""
    from ..api import resolve
    from ..widths import fill_input_width

    dims = {int(v["features"].shape[1]) for v in slides.values()}
    info, card = resolve("ssl_objective", stage.name, registry)
    fields = info.cls.Params.model_fields
    if len(dims) != 1 or "slide_encoder" not in fields or "slide_encoder_params" not in fields:
        return
    merged = {**(card.params if card else {}), **stage.params}
    name = merged.get("slide_encoder", fields["slide_encoder"].default)
    weights = merged.get("slide_encoder_weights", fields["slide_encoder_weights"].default
                         if "slide_encoder_weights" in fields else None)
    params = fill_input_width(name, merged.get("slide_encoder_params"), dims.pop(), registry=registry,
                              weights=weights, key_path="objective.params.slide_encoder",
                              source="the tile embeddings")
    stage.params = {**stage.params, "slide_encoder_params": params}


def _check_data(objective, job: str, data: str) -> None:
    """Raise ConfigError if the objective trains on another kind of data than the job provides."""
    if getattr(objective, "data", None) != data:
        raise ConfigError(
            "objective.name",
            f"objective {type(objective).name!r} trains on {objective.data!r} but the {job!r} job provides {data!r}",
        )


def train(objective, sample, n: int, cfg, out: Path, readers: list[str] = ()) -> list[dict]:
    """Train ``objective`` on ``n`` samples (``sample(k)``) with the shared Trainer; returns the log rows.
    ``readers``: the slide readers ``sample`` reads with (they decide how DataLoader workers start)."""
    from ..training import Trainer

    batch_size = cfg.batch_size
    if n < batch_size:
        log.warning("only %d samples: batch_size %d -> %d", n, batch_size, n)
        batch_size = n
    ds = ViewDataset(sample, n, objective.view, seed=cfg.train.seed)
    steps = n_batches(n, batch_size)
    trainer = None

    def after_step(model, step):
        objective.after_step(step, trainer.total_steps)

    trainer = Trainer(objective, cfg.train, out, steps_per_epoch=steps, after_step=after_step)
    write_json(
        out / OBJECTIVE_FILE, {"name": cfg.objective.name, "params": cfg.objective.params, "registry": cfg.registry}
    )
    batches = epoch_batches(ds, batch_size, objective.collate, cfg.num_workers, readers=readers)
    return trainer.fit(batches, seeded_step(objective))


def _report(hist: list[dict], out: Path) -> None:
    if hist:
        console.print(
            f"trained {hist[-1]['step']} steps: loss {hist[0]['loss']:.4f} (step {hist[0]['step']}) -> "
            f"{hist[-1]['loss']:.4f} (step {hist[-1]['step']}); checkpoints in {out / 'checkpoints'}"
        )
    else:
        console.print(f"nothing to train (already at the last step); checkpoints in {out / 'checkpoints'}")


def _save_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save

    write_bytes(path, save(tensors, metadata={k: str(v) for k, v in metadata.items()}))


# ------------------------------------------------------------------------------------------ embeddings
def resolve_embeddings(emb: EmbeddingsConfig, base: Path, output: str) -> dict[str, dict]:
    """Tile embeddings of the job: from a folder, files, or by running the embed job first (cached)."""
    if emb.embed is not None:
        from ..jobs import run_embed

        folder = Path(output) / "embeddings"
        console.print(f"computing tile embeddings with the embed job -> {folder}")
        code = run_embed(dict(emb.embed), base, str(folder), {})
        if code:
            log.warning(
                "the embed job failed on some slides (see %s); continuing with the others", folder / "manifest.csv"
            )
        return load_slide_embeddings(embedding_files(str(folder)), **emb.read_options())
    return load_slide_embeddings(embedding_files(emb.dir, emb.files), **emb.read_options())


# ------------------------------------------------------------------------------------------ jobs
def run_dinov2(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """DINOv2 tile-encoder pretraining on tiles streamed from ``inputs``."""
    from ..api import build
    from ..config import collect_slides

    cfg = load_job_config(raw, base, out)
    slides = collect_slides(cfg.inputs, base)
    objective = build_objective(cfg.objective, cfg.registry, cfg.train.seed)
    _check_data(objective, "dinov2", "tiles")
    tiler = build("tiler", cfg.tiler.name, registry=cfg.registry, **cfg.tiler.params)
    tiles = TileSource(
        [(s.slide_id, s.path, s.mpp) for s in slides], cfg.readers, tiler, cfg.max_tiles_per_slide, cfg.train.seed
    )
    console.print(f"dinov2: {len(tiles)} tiles from {len(tiles.grids)} slide(s)")
    outp = Path(cfg.output)
    hist = train(objective, tiles.__getitem__, len(tiles), cfg, outp, readers=tiles.slide_readers)
    _report(hist, outp)
    if not hasattr(objective, "tile_encoder_state_dict"):
        return 0
    _save_safetensors(
        outp / "tile_encoder.safetensors",
        objective.tile_encoder_state_dict("teacher"),
        {"tile_encoder": objective.tile_encoder_name, "source": "dinov2 teacher"},
    )
    console.print(f"tile encoder weights (teacher) -> {outp / 'tile_encoder.safetensors'}")
    return 0


def run_mae_slide(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """Masked-autoencoder pretraining of a slide encoder on tile embeddings."""
    cfg = load_job_config(raw, base, out)
    slides = resolve_embeddings(cfg.embeddings, base, cfg.output)
    fill_objective_width(cfg.objective, slides, cfg.registry)
    objective = build_objective(cfg.objective, cfg.registry, cfg.train.seed)
    _check_data(objective, "mae_slide", "slides")
    dims = {v["features"].shape[1] for v in slides.values()}
    if dims != {objective.in_dim}:
        raise ConfigError(
            "objective.params.slide_encoder_params",
            f"tile embeddings are {sorted(dims)}-d but the slide encoder takes {objective.in_dim}-d",
        )
    items = list(slides.values())
    console.print(f"mae_slide: {len(items)} slide(s), {sum(len(v['features']) for v in items)} tiles")
    outp = Path(cfg.output)
    hist = train(objective, items.__getitem__, len(items), cfg, outp)
    _report(hist, outp)
    if not hasattr(objective, "slide_encoder_state_dict"):
        return 0
    _save_safetensors(
        outp / "slide_encoder.safetensors",
        objective.slide_encoder_state_dict(),
        {"slide_encoder": objective.slide_encoder_name, "source": "mae_slide"},
    )
    console.print(f"slide encoder weights -> {outp / 'slide_encoder.safetensors'}")
    return 0


def _holdout(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split by slide_id (all pairs of a slide on the same side), ``fraction`` of the slides held out."""
    ids = sorted({p["slide_id"] for p in pairs})
    n_out = int(round(fraction * len(ids)))
    held = set(np.random.default_rng(seed).permutation(ids)[:n_out].tolist()) if n_out else set()
    return [p for p in pairs if p["slide_id"] not in held], [p for p in pairs if p["slide_id"] in held]


def run_clip(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """Slide–report CLIP training, then zero-shot evaluation if ``zeroshot:`` is given."""
    from ..api import build

    cfg = load_job_config(raw, base, out)
    slides = resolve_embeddings(cfg.embeddings, base, cfg.output)
    cleaner = None
    if cfg.report_cleaner is not None:
        cleaner = build("report_cleaner", cfg.report_cleaner.name, registry=cfg.registry, **cfg.report_cleaner.params)
    pairs = load_pairs(cfg.pairs, slides, cleaner)
    train_pairs, held = _holdout(pairs, cfg.holdout_fraction, cfg.train.seed)
    if len(train_pairs) < 2:
        raise ConfigError("pairs", f"contrastive training needs >= 2 training pairs, got {len(train_pairs)}")
    fill_objective_width(cfg.objective, slides, cfg.registry)
    objective = build_objective(cfg.objective, cfg.registry, cfg.train.seed)
    _check_data(objective, "clip", "pairs")
    console.print(
        f"clip: {len(train_pairs)} training pairs from {len({p['slide_id'] for p in train_pairs})} slide(s), "
        f"{len(held)} held out"
    )
    outp = Path(cfg.output)
    hist = train(objective, train_pairs.__getitem__, len(train_pairs), cfg, outp)
    _report(hist, outp)
    if cfg.zeroshot is not None:
        eval_pairs = [p for p in (held or pairs) if p["label"]]
        if not eval_pairs:
            raise ConfigError("zeroshot", f"no labelled rows to evaluate (add a 'label' column to {cfg.pairs})")
        if not held:
            console.print(
                "[yellow]zero-shot on the training slides (no held-out slides): a smoke test, not a result[/]"
            )
        evaluate_zero_shot(objective, eval_pairs, cfg.zeroshot, outp)
    return 0


def run_zeroshot(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """Zero-shot evaluation of a trained clip output folder on labelled slides."""
    from ..config import StageConfig
    from ..training import latest_checkpoint
    from ..pipeline import resolve_device

    cfg = load_job_config(raw, base, out)
    clip_dir = Path(cfg.clip)
    spec_file, ckpt = clip_dir / OBJECTIVE_FILE, latest_checkpoint(clip_dir)
    if not spec_file.is_file() or ckpt is None:
        raise ConfigError("clip", f"{clip_dir} is not a trained clip output ({OBJECTIVE_FILE} + checkpoints/ needed)")
    spec = json.loads(spec_file.read_text())
    with _no_random_weights_warning():  # the trained checkpoint replaces every weight just below
        objective = build_objective(StageConfig(name=spec["name"], params=spec["params"]), spec.get("registry", []))
    _check_data(objective, "zeroshot", "pairs")
    from safetensors.torch import load_model

    load_model(objective, str(ckpt / "model.safetensors"), strict=True)
    for tower in ("slide_encoder", "text_encoder"):
        if hasattr(getattr(objective, tower, None), "weights_source"):
            getattr(objective, tower).weights_source = f"clip checkpoint {ckpt}"
    objective.to(resolve_device(cfg.device))
    slides = resolve_embeddings(cfg.embeddings, base, cfg.output)
    rows = load_pairs(cfg.labels, slides, None, require_text=False)
    console.print(f"zeroshot: {_count(rows)} labelled, weights: trained clip checkpoint {ckpt}")
    evaluate_zero_shot(objective, rows, cfg.zeroshot, Path(cfg.output), checkpoint=ckpt)
    return 0


def _count(rows: list[dict]) -> str:
    """``"7 pairs from 3 slides"`` (several rows of a slide: regions or reports), or ``"3 slides"``."""
    n_slides = len({r["slide_id"] for r in rows})
    return f"{n_slides} slides" if n_slides == len(rows) else f"{len(rows)} pairs from {n_slides} slides"


@contextlib.contextmanager
def _no_random_weights_warning():
    """Drop the "weights: random (not pretrained)" warnings of models whose weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "weights: random (not pretrained)" not in record.getMessage()

    target = logging.getLogger("gigapath")
    target.addFilter(keep)
    try:
        yield
    finally:
        target.removeFilter(keep)


def evaluate_zero_shot(objective, rows: list[dict], zcfg, out: Path, checkpoint: Path | None = None) -> dict:
    """MI-Zero evaluation of a CLIP objective on labelled rows; writes zeroshot.json / zeroshot_probs.csv.

    ``checkpoint``: the checkpoint folder the objective's weights came from, recorded in ``zeroshot.json``
    (``checkpoint``); None records the clip run's own last checkpoint under ``out`` if there is one."""
    from ..zeroshot import DEFAULT_TEMPLATES, mutation_classes, zero_shot

    classes = zcfg.classes or mutation_classes(zcfg.mutation.gene, zcfg.mutation.cancer, zcfg.mutation.labels)
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise ConfigError(
            "zeroshot.classes", f"labels {unknown} in the data have no class (classes: {', '.join(classes)})"
        )
    objective.eval()
    with torch.inference_mode():
        embeds = torch.cat(
            [
                objective.encode_slides(torch.as_tensor(r["features"])[None], torch.as_tensor(r["coords"])[None])
                for r in rows
            ]
        )
        scale = float(objective.scale())
    res = zero_shot(
        embeds,
        objective.encode_texts,
        classes,
        [r["label"] for r in rows],
        tuple(zcfg.templates or DEFAULT_TEMPLATES),
        zcfg.n_prompt_sets,
        zcfg.seed,
        scale,
        zcfg.average,
    )
    if checkpoint is None:
        from ..training import latest_checkpoint

        checkpoint = latest_checkpoint(out)
    summary = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "n_slides": len({r["slide_id"] for r in rows}),
        "n_rows": len(rows),
        "n_prompt_sets": zcfg.n_prompt_sets,
        "classes": res.labels,
        "logit_scale": scale,
        "metrics": res.summary,
        "per_prompt_set": res.per_set,
    }
    write_json(out / "zeroshot.json", summary)
    mean = res.probs.mean(0)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide_id", "region", "label", "predicted", *[f"p_{c}" for c in res.labels]])
    for r, p in zip(rows, mean):
        region = "" if r["region"] is None else " ".join(f"{v:g}" for v in r["region"])
        w.writerow([r["slide_id"], region, r["label"], res.labels[int(p.argmax())], *[f"{v:.6f}" for v in p]])
    write_bytes(out / "zeroshot_probs.csv", buf.getvalue().encode())
    console.print(f"zero-shot ({zcfg.n_prompt_sets} prompt sets, {_count(rows)}, classes {', '.join(res.labels)}):")
    for m, v in res.summary.items():
        console.print(f"  {m:9s} {v['mean']:.3f} ± {v['sem']:.3f} (s.e.m.)")
    console.print(f"-> {out / 'zeroshot.json'}, {out / 'zeroshot_probs.csv'}")
    return summary
