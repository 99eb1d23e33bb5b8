"""Validated configs of the pretraining jobs (unknown keys are errors, reported with their key path).

Relative paths are resolved against the folder of the config file, like the ``embed`` job's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..config import InputsConfig, StageConfig, Strict, parse_model, resolve_output
from ..errors import ConfigError
from ..training import TrainConfig


class EmbeddingsConfig(Strict):
    """Where tile embeddings come from (exactly one of the three)."""

    dir: str | None = Field(None, description="output folder of an embed job (<dir>/<slide_id>/tile_embeddings.h5), "
                            "another tool's feature folder or a CSV slide_id,features_path (docs/formats.md)")
    files: list[str] = Field(default_factory=list, description="feature file paths or globs (slide_id = the folder "
                             "of a tile_embeddings.h5, else the file name)")
    embed: dict[str, Any] | None = Field(None, description="an embed-job config run first into <output>/embeddings")
    level0_mpp: float | None = Field(None, gt=0, description="µm/px of level 0 for feature files that do not "
                                     "record it (docs/formats.md)")
    coords_unit: Literal["level0_px", "grid_px", "um"] | None = Field(
        None, description="unit of the feature files' coords when their attributes do not tell it")
    tile_size: int = Field(256, ge=1, description="grid cell side in px at 0.5 µm/px")

    def read_options(self) -> dict[str, Any]:
        """Keywords of :func:`gigapath_core.interop.read_tile_features`."""
        return {"level0_mpp": self.level0_mpp, "coords_unit": self.coords_unit, "tile_size": self.tile_size,
                "key_prefix": "embeddings."}

    @model_validator(mode="after")
    def _one(self):
        if sum([self.dir is not None, bool(self.files), self.embed is not None]) != 1:
            raise ValueError("give exactly one of dir, files or embed")
        return self


class PretrainBase(Strict):
    output: str | None = Field(None, description="output folder (or --out): checkpoints/, train_log.jsonl, exports")
    registry: list[str] = Field(default_factory=list, description="extra registry.yaml files")
    objective: StageConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    batch_size: int = Field(8, ge=1, description="samples per micro-batch")
    num_workers: int = Field(0, ge=0, description="DataLoader workers computing views (reading tiles from slides: "
                                                  "forked, or from a forkserver when a reader is not fork-safe, as "
                                                  "in the tile-embedding stage)")


class DINOv2JobConfig(PretrainBase):
    """``job: dinov2`` — tile-encoder pretraining on tiles streamed from slides."""

    job: Literal["dinov2"]
    inputs: InputsConfig
    readers: list[str] = Field(["openslide", "tifffile", "pyvips"], min_length=1)
    tiler: StageConfig = Field(default_factory=lambda: StageConfig(name="otsu"))
    max_tiles_per_slide: int | None = Field(None, ge=1, description="random subset of each slide's tiles")


class MAEJobConfig(PretrainBase):
    """``job: mae_slide`` — slide-encoder pretraining on tile embeddings."""

    job: Literal["mae_slide"]
    embeddings: EmbeddingsConfig


class MutationConfig(Strict):
    gene: str = Field(..., min_length=1, description="gene symbol, e.g. EGFR")
    cancer: str | None = Field(None, description="appended to each class name, e.g. 'lung adenocarcinoma'")
    labels: tuple[str, str] = Field(("mutated", "wild-type"), description="label values of the two classes")


class ZeroShotConfig(Strict):
    """MI-Zero protocol (see :mod:`gigapath_core.zeroshot`). Give ``classes`` or ``mutation``."""

    classes: dict[str, list[str]] | None = Field(None, description="label -> class-name synonyms")
    mutation: MutationConfig | None = None
    templates: list[str] | None = Field(None, description="prompt templates with '{}' (default: built-in set)")
    n_prompt_sets: int = Field(50, ge=1)
    seed: int = 0
    average: Literal["macro", "weighted", "binary"] = Field("macro", description="precision/F1 averaging")

    @model_validator(mode="after")
    def _one(self):
        if (self.classes is None) == (self.mutation is None):
            raise ValueError("give exactly one of classes or mutation")
        if self.classes is not None and (len(self.classes) < 2 or any(not v for v in self.classes.values())):
            raise ValueError("need >= 2 classes, each with >= 1 class name")
        for t in self.templates or []:
            if "{}" not in t:
                raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")
        return self


class CLIPJobConfig(PretrainBase):
    """``job: clip`` — slide–report contrastive training, then optional zero-shot evaluation."""

    job: Literal["clip"]
    embeddings: EmbeddingsConfig
    pairs: str = Field(..., description="CSV: slide_id, report[, region][, label]")
    report_cleaner: StageConfig | None = Field(default_factory=lambda: StageConfig(name="rules"))
    holdout_fraction: float = Field(
        0.0, ge=0, lt=1, description="fraction of slides held out from training (0.2 in the paper)"
    )
    zeroshot: ZeroShotConfig | None = None


class ZeroShotJobConfig(Strict):
    """``job: zeroshot`` — MI-Zero evaluation of a trained CLIP output folder on labelled slides."""

    job: Literal["zeroshot"]
    output: str | None = None
    registry: list[str] = Field(default_factory=list)
    clip: str = Field(..., description="output folder of a clip job (clip_config.json + checkpoints/)")
    embeddings: EmbeddingsConfig
    labels: str = Field(..., description="CSV: slide_id, label[, region]")
    zeroshot: ZeroShotConfig
    device: str = "auto"


JOB_MODELS = {
    "dinov2": DINOv2JobConfig,
    "mae_slide": MAEJobConfig,
    "clip": CLIPJobConfig,
    "zeroshot": ZeroShotJobConfig,
}


def resolve_path(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def load_job_config(raw: dict, base: Path, out: str | None):
    """Validate ``raw`` against its job's model; resolve paths; check plugin names and params.

    Raises ConfigError with the key path of the first problem, before any work.
    """
    from ..api import validate_stage

    model = JOB_MODELS[raw.get("job")]
    cfg = parse_model(model, raw)
    resolve_output(cfg, base, out)
    cfg.registry = [resolve_path(r, base) for r in cfg.registry]
    if hasattr(cfg, "objective"):
        validate_stage("ssl_objective", cfg.objective.name, cfg.objective.params, cfg.registry, "objective")
    emb = getattr(cfg, "embeddings", None)
    if emb is not None:
        if emb.dir is not None:
            emb.dir = resolve_path(emb.dir, base)
        emb.files = [resolve_path(f, base) for f in emb.files]
    for key in ("pairs", "labels", "clip"):
        if getattr(cfg, key, None):
            setattr(cfg, key, resolve_path(getattr(cfg, key), base))
            if not Path(getattr(cfg, key)).exists():
                raise ConfigError(key, f"not found: {getattr(cfg, key)}")
    cleaner = getattr(cfg, "report_cleaner", None)
    if cleaner is not None:
        from ..reports.job import resolve_cleaner_paths

        cleaner.params = resolve_cleaner_paths(cleaner.params, base)  # exemplars/cache_dir: relative to the config
        validate_stage("report_cleaner", cleaner.name, cleaner.params, cfg.registry, "report_cleaner")
    return cfg
