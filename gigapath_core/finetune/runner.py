"""The ``finetune`` job: k-fold fine-tuning of (slide encoder +) task head on saved tile embeddings (SPEC §4).

Output folder::

    OUT/config.yaml            the validated config (every default filled in)
    OUT/splits.csv             fold, split, slide_id, patient_id (reusable: folds.splits)
    OUT/fold_<k>/              checkpoints/ (safetensors), train_log.jsonl, predictions.csv, metrics.json, status.json
    OUT/predictions.csv        every fold's test (and val) predictions
    OUT/metrics.json           per-fold metrics and mean ± s.e.m. over folds (test splits)
    OUT/results.md, results.csv, roc.png, pr.png

Resumable: a fold whose ``status.json`` says ``ok`` for the same config fingerprint is not retrained; an
interrupted fold continues from its last checkpoint (shared Trainer).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import ConfigError
from ..evaluation.folds import Splits, fold_sizes, make_folds, read_splits, splits_csv, write_splits
from ..evaluation.metrics import compute_metrics
from ..evaluation.predictions import prediction_rows, read_predictions, to_arrays, write_predictions
from ..progress import console
from ..report import try_write_run_report
from ..store import read_status, write_bytes, write_json, write_status
from ..threads import torch_threads
from .config import FinetuneConfig, load_finetune_config
from .data import FinetuneData, SlideRecord, load_data, load_slide
from .encoder_cache import FrozenEncoderCache, slide_key
from .model import SlideClassifier, layer_ids

log = logging.getLogger("gigapath")
FOLD_MARKER = "fingerprint.txt"


def run_finetune(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """``gigapath run`` entry point of ``job: finetune``. Returns 0."""
    cfg = load_finetune_config(raw, base, out)
    finetune(cfg)
    return 0


# ------------------------------------------------------------------------------------------------ folds
def prepare_splits(cfg: FinetuneConfig, data: FinetuneData) -> Splits:
    """Read ``folds.splits`` (checked against the data) or make patient-grouped stratified folds; either way
    write ``OUT/splits.csv``.

    Raises ConfigError if a reused splits file and the data disagree on slides or patients.
    """
    if cfg.folds.splits:
        splits = read_splits(cfg.folds.splits)
        have, want = set(splits.patients), set(data.slides)
        for sid in sorted(have - want):
            why = data.excluded.get(sid, "not in the labels CSV")
            raise ConfigError("folds.splits", f"slide {sid!r} of {cfg.folds.splits} is not in the data ({why})")
        for sid in sorted(want - have):
            raise ConfigError("folds.splits",
                              f"slide {sid!r} has labels and embeddings but is not in {cfg.folds.splits}")
        for sid, pid in splits.patients.items():
            if data.slides[sid].patient_id != pid:
                raise ConfigError("folds.splits", f"slide {sid!r} belongs to patient {data.slides[sid].patient_id!r} "
                                  f"in the labels but to {pid!r} in {cfg.folds.splits}")
    else:
        ids = data.ids()
        splits = make_folds(ids, [data.slides[s].patient_id for s in ids],
                            [data.task.stratum(data.slides[s].target) for s in ids],
                            cfg.folds.k, cfg.folds.seed, cfg.folds.val_fraction)
    write_splits(Path(cfg.output) / "splits.csv", splits)
    return splits


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg: FinetuneConfig, data: FinetuneData) -> SlideClassifier:
    """Slide encoder (weights per config) + task head, with widths and output count filled in.

    Raises ConfigError if a width set in the config disagrees with the data or the task.
    """
    from ..api import build, resolve
    from ..widths import fill_input_width

    se_cfg, head_cfg = cfg.model.slide_encoder, cfg.model.head
    encoder = None
    if se_cfg is not None:
        params = fill_input_width(se_cfg.name, se_cfg.params, data.tile_dim, registry=cfg.registry,
                                  weights=se_cfg.weights, key_path="model.slide_encoder",
                                  source="the tile embeddings")
        encoder = build("slide_encoder", se_cfg.name, weights=se_cfg.weights, registry=cfg.registry, **params)
        if encoder.in_dim != data.tile_dim:
            raise ConfigError("model.slide_encoder.params", f"the tile embeddings are {data.tile_dim}-d but the slide "
                              f"encoder {se_cfg.name!r} takes {encoder.in_dim}-d")
    width = encoder.embed_dim if encoder is not None else data.tile_dim
    info, card = resolve("task_head", head_cfg.name, cfg.registry)
    fields = info.cls.Params.model_fields
    params = {**(card.params if card else {}), **head_cfg.params}
    auto = {"in_dim": width, "num_classes": data.task.num_outputs}
    for key, value in auto.items():
        if key not in fields:
            continue
        if key in params and params[key] != value:
            what = "the task's number of outputs" if key == "num_classes" else "the width of the head's input"
            raise ConfigError(f"model.head.params.{key}", f"{params[key]} does not match {what} ({value}); "
                              "leave it out to fill it in automatically")
        params[key] = value
    if params.get("shortcut") and "shortcut_dim" in fields and params.get("shortcut_dim") is None:
        params["shortcut_dim"] = data.tile_dim
    head = build("task_head", head_cfg.name, registry=cfg.registry, **params)
    return SlideClassifier(encoder, head, freeze_encoder=bool(se_cfg and se_cfg.freeze),
                           standardize_dim=data.tile_dim if cfg.model.standardize_features else None)


def whole_slide_key(record: SlideRecord, max_tiles: int | None) -> str | None:
    """The encoder-cache key of ``record`` if a load with ``max_tiles`` gives the whole slide, else None."""
    if max_tiles is not None and record.n_tiles > max_tiles:
        return None
    return slide_key(record.path, record.read_options)


def _check_forward(model: SlideClassifier, cfg: FinetuneConfig, data: FinetuneData, slide_id: str) -> None:
    """One forward pass before training, so a head/encoder mismatch is a config error, not a crash mid-run."""
    rec = data.slides[slide_id]
    feats, coords = load_slide(rec, max_tiles=64, rng=np.random.default_rng(0))
    try:
        with torch.no_grad():
            logits = model.eval()(feats, coords, cache_key=whole_slide_key(rec, 64))
    except (ValueError, RuntimeError) as err:
        raise ConfigError("model", f"the model cannot run on {slide_id}: {str(err).splitlines()[0]}") from None
    if tuple(logits.shape) != (1, data.task.num_outputs):
        raise ConfigError("model.head", f"the head gives logits of shape {tuple(logits.shape)}, the task needs "
                          f"(1, {data.task.num_outputs})")


@torch.inference_mode()
def predict(model: SlideClassifier, data: FinetuneData, slide_ids: list[str], device: torch.device,
            precision: str) -> np.ndarray:
    """(n, num_outputs) float64 probabilities for ``slide_ids`` (all tiles of each slide)."""
    from ..stages.tile_embedding import autocast_context

    model.eval()
    out = np.zeros((len(slide_ids), data.task.num_outputs), dtype=np.float64)
    for i, sid in enumerate(slide_ids):
        rec = data.slides[sid]
        feats, coords = load_slide(rec)
        with autocast_context(device, precision):
            logits = model(feats.to(device), coords.to(device), cache_key=whole_slide_key(rec, None))
        out[i] = data.task.probs(logits)[0]
    return out


# ------------------------------------------------------------------------------------------------ one fold
SMALL_MODEL = 10_000_000


def cpu_threads(setting: int | str, model: torch.nn.Module, device: torch.device) -> int:
    """Threads for torch on CPU: the setting, or for ``auto`` 1 below 10 M parameters (tiny ops run faster
    without thread hand-offs, and much faster on a busy machine) and torch's current default above."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        return 1
    return torch.get_num_threads()


def run_fold(cfg: FinetuneConfig, data: FinetuneData, splits: Splits, fold: int, fingerprint: str,
             encoder_cache: FrozenEncoderCache | None = None) -> dict[str, Any]:
    """Train and evaluate one fold (or reuse its finished outputs). Returns its rows and model provenance.

    ``encoder_cache``: where a frozen slide encoder's whole-slide outputs are kept for the run (None: none kept).
    """
    from ..training import Trainer, seed_everything

    fold_dir = Path(cfg.output) / f"fold_{fold}"
    status = read_status(fold_dir)
    if status and status.get("status") == "ok" and status.get("fingerprint") == fingerprint \
            and (fold_dir / "predictions.csv").is_file():
        console.print(f"fold {fold}: done by an earlier run, reusing {fold_dir / 'predictions.csv'}")
        return {"rows": read_predictions(fold_dir / "predictions.csv"), "models": status.get("models", {})}
    marker = fold_dir / FOLD_MARKER
    if marker.is_file() and marker.read_text().strip() != fingerprint:
        raise ConfigError("output", f"{fold_dir} holds a run with a different config or different folds; "
                          "use another output folder (or delete that one)")
    write_bytes(marker, (fingerprint + "\n").encode())
    parts = splits.folds[fold]
    train_ids, task = parts["train"], data.task
    console.print(f"fold {fold + 1}/{splits.k}: {len(train_ids)} train, {len(parts['val'])} val, "
                  f"{len(parts['test'])} test slides")
    seed = cfg.train.seed + fold
    seed_everything(seed)
    model = build_model(cfg, data)
    if model.standardizer is not None:
        model.standardizer.fit(load_slide(data.slides[s])[0][0] for s in train_ids)
    model.use_encoder_cache(encoder_cache)  # after the weights and the standardizer are final
    _check_forward(model, cfg, data, train_ids[0])
    layer_id, num_layers = layer_ids(model)
    tcfg = cfg.train.trainer_config(seed, len(train_ids))
    trainer = Trainer(model, tcfg, fold_dir, steps_per_epoch=len(train_ids), layer_id=layer_id, num_layers=num_layers)
    device = trainer.device

    def load(epoch: int, i: int, j: int):
        """Micro-batch ``i`` of ``epoch``: training slide ``j``, its tile subset drawn from a generator keyed to
        (seed, fold, epoch, i) — the same on any number of ranks and after a resume."""
        rec = data.slides[train_ids[j]]
        feats, coords = load_slide(rec, cfg.data.max_tiles, np.random.default_rng([cfg.train.seed, fold, epoch, i]))
        return feats, coords, task.target_tensor(rec.target), whole_slide_key(rec, cfg.data.max_tiles)

    def batches(epoch: int):
        order = np.random.default_rng([cfg.train.seed, fold, epoch]).permutation(len(train_ids))
        # lazy: the trainer loads a slide only on the rank that trains on it (see training/trainer.py)
        return (functools.partial(load, epoch, i, int(j)) for i, j in enumerate(order))

    def step_fn(m, batch):
        *tensors, key = batch
        feats, coords, target = (t.to(device, non_blocking=True) for t in tensors)
        core = getattr(m, "module", m)  # DDP wraps the model; the head's loss hook lives on the inner one
        return {"loss": core.training_loss(task.loss(m(feats, coords, cache_key=key), target), target)}

    with torch_threads(cpu_threads(cfg.cpu_threads, model, device)):
        trainer.fit(batches, step_fn)
        rows: list[dict] = []
        for split in ("test", "val"):
            ids = parts[split]
            if not ids:
                continue
            probs = predict(model, data, ids, device, tcfg.precision)
            targets = [data.slides[s].target for s in ids]
            rows += prediction_rows(task.type, task.class_names, fold, split, ids,
                                    [data.slides[s].patient_id for s in ids], targets, probs)
    write_predictions(fold_dir / "predictions.csv", rows, task.type, task.class_names)
    models = {"slide_encoder": cfg.model.slide_encoder.name if cfg.model.slide_encoder else None,
              "slide_encoder_weights": getattr(model.slide_encoder, "weights_source", None),
              "slide_encoder_frozen": model.freeze_encoder, "head": cfg.model.head.name,
              "slide_encoder_parameters": sum(p.numel() for p in model.slide_encoder.parameters())
              if model.slide_encoder is not None else 0,
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    y, p = to_arrays([r for r in rows if r["split"] == "test"], task.type, task.class_names)
    fold_metrics = compute_metrics(task.type, y, p, task.class_names, task.ordinal, cfg.threshold)
    write_json(fold_dir / "metrics.json", fold_metrics)
    write_status(fold_dir, {"status": "ok", "fingerprint": fingerprint, "fold": fold, "steps": trainer.step,
                            "models": models})
    return {"rows": read_predictions(fold_dir / "predictions.csv"), "models": models}


# ------------------------------------------------------------------------------------------------ the job
def finetune(cfg: FinetuneConfig, encoder_cache: FrozenEncoderCache | None = None) -> dict[str, Any]:
    """Run every fold of a validated config and write the reports. Returns the metrics.json content.

    ``encoder_cache``: a frozen slide encoder's outputs shared with other runs (the ablation passes one to all
    its variants); by default a new one of ``cfg.encoder_cache_gb``.
    """
    from .report import announce_provenance, write_report

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data)
    announce_provenance(data)
    splits = prepare_splits(cfg, data)
    write_bytes(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    labels_hash = hashlib.sha1(Path(cfg.data.labels).read_bytes()).hexdigest()[:12]
    splits_hash = hashlib.sha1(splits_csv(splits).encode()).hexdigest()[:12]
    fingerprint = f"{cfg.fingerprint()}-{labels_hash}-{splits_hash}"
    sizes = fold_sizes(splits)
    console.print(f"{len(data.slides)} slides of {len({r.patient_id for r in data.slides.values()})} patients, "
                  f"task {data.task.type} {list(data.task.class_names)}, {splits.k} folds")
    if encoder_cache is None:
        encoder_cache = FrozenEncoderCache(max_bytes=int(cfg.encoder_cache_gb * (1 << 30)))
    results = [run_fold(cfg, data, splits, f, fingerprint, encoder_cache) for f in range(splits.k)]
    if encoder_cache.hits:
        log.info("frozen slide encoder: %d outputs reused, %d computed (%d slides, %.1f MiB cached)",
                 encoder_cache.hits, encoder_cache.misses, len(encoder_cache), encoder_cache.nbytes / 2**20)
    metrics = write_report(cfg, data, splits, sizes, results, fingerprint)
    try_write_run_report(out)  # OUT/report.html
    return metrics
