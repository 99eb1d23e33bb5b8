"""The ``finetune`` job: k-fold fine-tuning of (slide encoder +) task head on saved tile embeddings (Xu et al. 2024,
Methods: mutation prediction, cancer subtyping).

Output folder::

    OUT/config.yaml            the validated config (every default filled in)
    OUT/splits.csv             fold, split, slide_id, patient_id (reusable: folds.splits)
    OUT/fold_<k>/              checkpoints/ (safetensors), train_log.jsonl, predictions.csv, metrics.json, status.json
    OUT/predictions.csv        every fold's test (and val) predictions
    OUT/metrics.json           per-fold metrics and mean ± s.e.m. over folds (test splits)
    OUT/results.md, results.csv, roc.png, pr.png

Nothing is written before the pre-flight (:mod:`.preflight`, the checks ``gigapath validate`` runs) passes.
Resumable: a fold whose ``status.json`` says ``ok`` for the same config fingerprint is not retrained; an
interrupted fold continues from its last checkpoint (shared Trainer). ``fold_<k>/fingerprint.txt`` is written
when the fold's training starts; another config's training in a fold folder is refused.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..evaluation.folds import Splits, fold_sizes, write_splits
from ..evaluation.metrics import compute_metrics
from ..evaluation.predictions import prediction_rows, read_predictions, to_arrays, write_predictions
from ..progress import console
from ..report import try_write_run_report
from ..store import read_status, write_bytes, write_json, write_status
from ..threads import torch_threads
from .build import build_model, check_forward, whole_slide_key
from .config import FinetuneConfig
from .data import FinetuneData, load_slide
from .encoder_cache import FrozenEncoderCache
from .model import SlideClassifier, layer_ids
from .preflight import FOLD_MARKER, Checked, check_finetune, fold_done, prepare_finetune

log = logging.getLogger("gigapath")


def run_finetune(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """``gigapath run`` entry point of ``job: finetune``: the pre-flight (as ``gigapath validate``), then the
    run. Returns 0."""
    checked = prepare_finetune(raw, base, out)
    finetune(checked.cfg, checked=checked)
    return 0


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
    name = f"fold_{fold} ({fold + 1} of {splits.k})"  # named as its folder and `gigapath heatmap --fold`
    if fold_done(fold_dir, fingerprint):  # also refuses a folder trained with another config
        console.print(f"{name}: done by an earlier run, reusing {fold_dir / 'predictions.csv'}")
        return {"rows": read_predictions(fold_dir / "predictions.csv"),
                "models": (read_status(fold_dir) or {}).get("models", {})}
    parts = splits.folds[fold]
    train_ids, task = parts["train"], data.task
    console.print(f"{name}: {len(train_ids)} train, {len(parts['val'])} val, {len(parts['test'])} test slides")
    seed = cfg.train.seed + fold
    seed_everything(seed)
    model = build_model(cfg, data)
    if model.standardizer is not None:
        model.standardizer.fit(load_slide(data.slides[s])[0][0] for s in train_ids)
    model.use_encoder_cache(encoder_cache)  # after the weights and the standardizer are final
    check_forward(model, data, train_ids[0])
    layer_id, num_layers = layer_ids(model)
    tcfg = cfg.train.trainer_config(seed, len(train_ids))
    trainer = Trainer(model, tcfg, fold_dir, steps_per_epoch=len(train_ids), layer_id=layer_id, num_layers=num_layers)
    device = trainer.device
    # the fold's folder is claimed only now that its training starts: a run stopped by an error before this
    # point leaves nothing that locks the folder (see preflight.fold_done)
    write_bytes(fold_dir / FOLD_MARKER, (fingerprint + "\n").encode())

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
def finetune(cfg: FinetuneConfig, encoder_cache: FrozenEncoderCache | None = None,
             checked: Checked | None = None) -> dict[str, Any]:
    """Run every fold of a validated config and write the reports. Returns the metrics.json content.

    ``encoder_cache``: a frozen slide encoder's outputs shared with other runs (the ablation passes one to all
    its variants); by default a new one of ``cfg.encoder_cache_gb``. ``checked``: the pre-flight's result for
    ``cfg`` (:func:`.preflight.check_finetune`, run here when None). Nothing is written before it passes.

    Raises ConfigError (from the pre-flight) before any file is written.
    """
    from .report import announce_provenance, write_report

    checked = checked if checked is not None else check_finetune(cfg)
    data, splits, fingerprint = checked.data, checked.splits, checked.fingerprint
    announce_provenance(data)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    write_splits(out / "splits.csv", splits)
    write_bytes(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())
    sizes = fold_sizes(splits)
    console.print(f"{len(data.slides)} slides of {len({r.patient_id for r in data.slides.values()})} patients, "
                  f"task {data.task.type} {list(data.task.class_names)}, {splits.k} folds (fold_0 .. "
                  f"fold_{splits.k - 1})")
    if encoder_cache is None:
        encoder_cache = FrozenEncoderCache(max_bytes=int(cfg.encoder_cache_gb * (1 << 30)))
    results = [run_fold(cfg, data, splits, f, fingerprint, encoder_cache) for f in range(splits.k)]
    if encoder_cache.hits:
        log.info("frozen slide encoder: %d outputs reused, %d computed (%d slides, %.1f MiB cached)",
                 encoder_cache.hits, encoder_cache.misses, len(encoder_cache), encoder_cache.nbytes / 2**20)
    metrics = write_report(cfg, data, splits, sizes, results, fingerprint)
    try_write_run_report(out)  # OUT/report.html
    return metrics
