"""The ``finetune`` job config (``job: finetune``), strictly validated with key-path errors (Xu et al. 2024, Methods:
mutation prediction, cancer subtyping defaults).

Relative paths are resolved against the config file's folder (``--out`` against the current directory).
Defaults follow the paper's mutation-prediction setup: AdamW lr 2e-3, weight decay 0.01, batch 1 with gradient
accumulation 32, 20 epochs, layer-wise lr decay 0.9 from the top, warm-up then cosine decay.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from ..config import StageConfig, Strict, parse_model, resolve_output
from ..errors import ConfigError
from ..training import TrainConfig


class DataConfig(Strict):
    embeddings: list[str] = Field(min_length=1,
                                  description="tile-feature sources: embed-run output folder(s) with "
                                  "<slide_id>/tile_embeddings.h5, other tools' folders (<slide_id>.h5 of TRIDENT/"
                                  "STAMP/prov-gigapath, CLAM h5_files/ + pt_files/) or a CSV with slide_id, "
                                  "features_path[, level0_mpp] (docs/formats.md)")
    level0_mpp: float | None = Field(None, gt=0, description="µm/px of the slides' level 0, for feature files "
                                     "that do not record it (CLAM, STAMP level-0 px); a CSV column level0_mpp wins")
    coords_unit: Literal["level0_px", "grid_px", "um"] | None = Field(
        None, description="unit of the feature files' coords when their attributes do not tell it")
    tile_size: int = Field(256, ge=1, description="grid cell side in px at 0.5 µm/px (the slide encoder's grid)")
    labels: str = Field(description="labels CSV: slide_id, patient_id and the label column(s)")
    label_columns: list[str] = Field(min_length=1, description="label column(s) of the CSV")
    task: Literal["binary", "multiclass", "multilabel"]
    classes: list[str] | None = Field(None, description="class order; binary: [negative, positive]")
    ordinal: bool = Field(False, description="multiclass classes are ordered (adds quadratic-weighted kappa)")
    slides_per_patient: Literal["largest", "all"] = Field("largest", description="largest = the paper's choice")
    missing_embeddings: Literal["error", "skip"] = Field("error", description="slides in the CSV without embeddings")
    max_tiles: int | None = Field(None, ge=1, description="train on a random subset of at most this many tiles "
                                  "per slide and step (memory cap); evaluation always uses every tile")

    @field_validator("embeddings", "label_columns", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class FoldsConfig(Strict):
    k: int = Field(5, ge=2, description="number of folds (the paper: 10)")
    seed: int = Field(0, description="fold shuffling seed")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of training patients per fold held out as val")
    splits: str | None = Field(None, description="reuse this splits CSV instead of making folds")


class SlideEncoderSpec(StageConfig):
    freeze: bool = Field(False, description="keep the slide encoder's weights fixed (and in eval mode)")


class HeadSpec(Strict):
    name: str = "abmil"
    params: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(Strict):
    slide_encoder: SlideEncoderSpec | None = Field(None, description="None: the head pools the tile embeddings")
    head: HeadSpec = Field(default_factory=HeadSpec)
    standardize_features: bool = Field(
        False, description="z-score every tile-feature dimension with the training split's mean and std (kept in "
        "the checkpoint); for frozen features of odd scale, e.g. a randomly initialised tile encoder. Leave off "
        "for a pretrained slide encoder, which expects the raw tile embeddings")


class FinetuneTrainConfig(TrainConfig):
    lr: float = Field(2e-3, gt=0, description="peak learning rate (paper: 2e-3 mutation, 4e-3 subtyping)")
    weight_decay: float = Field(0.01, ge=0)
    layer_decay: float | None = Field(0.9, gt=0, le=1, description="layer-wise lr decay per layer from the top")
    epochs: int = Field(20, ge=1)
    grad_accum: int = Field(32, ge=1, description="slides per optimiser step (batch 1 per micro-batch)")
    keep_checkpoints: int = Field(1, ge=1)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up length; warmup_steps > 0 overrides it")

    def trainer_config(self, seed: int, steps_per_epoch: int) -> TrainConfig:
        """The shared trainer's config for one fold (warm-up converted to optimiser steps)."""
        data = self.model_dump(exclude={"warmup_epochs"})
        if not self.warmup_steps:
            steps = -(-steps_per_epoch // self.grad_accum)
            data["warmup_steps"] = int(round(self.warmup_epochs * steps))
        data["seed"] = seed
        return TrainConfig(**data)


class FinetuneConfig(Strict):
    """``job: finetune``: labels + tile embeddings -> k-fold fine-tuning and evaluation."""

    job: Literal["finetune"] = "finetune"
    data: DataConfig
    folds: FoldsConfig = Field(default_factory=FoldsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: FinetuneTrainConfig = Field(default_factory=FinetuneTrainConfig)
    threshold: float = Field(0.5, gt=0, lt=1, description="decision threshold for balanced accuracy")
    plots: bool = Field(True, description="write roc.png and pr.png")
    cpu_threads: int | Literal["auto"] = Field(
        "auto", description="torch CPU threads while training on CPU; auto = 1 for models under 10 M parameters "
        "(their ops are too small to split, and thread hand-offs dominate), else torch's default")
    encoder_cache_gb: float = Field(
        4.0, ge=0, description="memory (GiB, CPU) for the outputs of a frozen slide encoder, computed once per "
        "slide per run and reused by every epoch, fold and ablation variant; 0 = recompute every time")
    output: str | None = Field(None, description="output folder (or --out)")
    registry: list[str] = Field(default_factory=list, description="extra registry.yaml files")

    def fingerprint(self) -> str:
        """Hash of everything that changes the results (not the output folder, device or progress bars)."""
        d = self.model_dump(exclude={"output": True, "plots": True, "cpu_threads": True,
                                     "encoder_cache_gb": True,
                                     "train": {"device", "progress"}})
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _abs(base: Path, p: str) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def absolutize_paths(raw: dict, base: Path) -> dict:
    """Resolve the relative paths of a raw finetune mapping against ``base`` (a copy; unknown shapes untouched)."""
    raw = json.loads(json.dumps(raw, default=str))
    data = raw.get("data")
    if isinstance(data, dict):
        emb = data.get("embeddings")
        if isinstance(emb, str):
            data["embeddings"] = _abs(base, emb)
        elif isinstance(emb, list):
            data["embeddings"] = [_abs(base, e) if isinstance(e, str) else e for e in emb]
        if isinstance(data.get("labels"), str):
            data["labels"] = _abs(base, data["labels"])
    folds = raw.get("folds")
    if isinstance(folds, dict) and isinstance(folds.get("splits"), str):
        folds["splits"] = _abs(base, folds["splits"])
    if isinstance(raw.get("output"), str):
        raw["output"] = _abs(base, raw["output"])
    if isinstance(raw.get("registry"), list):
        raw["registry"] = [_abs(base, r) if isinstance(r, str) else r for r in raw["registry"]]
    return raw


def load_finetune_config(raw: dict, base: Path, out: str | None = None) -> FinetuneConfig:
    """Validate a finetune mapping (keys, types, files, plugin names and params) before any work.

    Raises:
        ConfigError: with the key path of the first problem (``train.lr``, ``data.labels``, ``model.head.name``...).
    """
    from ..api import validate_stage

    raw = absolutize_paths(raw, base)
    cfg = parse_model(FinetuneConfig, raw)
    resolve_output(cfg, base, out)  # raw paths were made absolute above
    if not Path(cfg.data.labels).is_file():
        raise ConfigError("data.labels", f"labels CSV not found: {cfg.data.labels}")
    for i, folder in enumerate(cfg.data.embeddings):
        if folder.lower().endswith(".csv"):
            if not Path(folder).is_file():
                raise ConfigError(f"data.embeddings[{i}]", f"feature table (CSV) not found: {folder}")
        elif not Path(folder).is_dir():
            raise ConfigError(f"data.embeddings[{i}]", f"embeddings folder not found: {folder} (the output folder "
                              "of a `gigapath run` embed job, or a folder of TRIDENT/CLAM/STAMP feature files)")
    if cfg.folds.splits is not None and not Path(cfg.folds.splits).is_file():
        raise ConfigError("folds.splits", f"splits file not found: {cfg.folds.splits}")
    se = cfg.model.slide_encoder
    if se is not None:
        validate_stage("slide_encoder", se.name, se.params, cfg.registry, "model.slide_encoder")
    validate_stage("task_head", cfg.model.head.name, cfg.model.head.params, cfg.registry, "model.head")
    return cfg
