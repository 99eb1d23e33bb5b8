"""Per-tile scores of a slide: a fine-tuned head's attention and tile-level class scores (one fold or the mean
over folds), or the zero-shot CLIP model's tile-token similarity to each class prompt.

Fine-tuned ABMIL head (Ilse et al. 2018; plugins/gigapath_plugins/task_heads/abmil.py): with tile tokens
``h_k`` the head computes attention ``a_k`` (softmax over the slide's tiles, sums to 1) and the slide logits
``W (sum_k a_k h_k) + b = sum_k a_k (W h_k + b)``. The *tile class score* is ``W h_k + b`` (the tile's logit),
turned into a probability like the slide's (sigmoid for binary/multilabel, softmax for multiclass): the slide
logit is the attention-weighted mean of the tile logits, so a tile with high attention and high score is what
drives the slide's prediction (cf. CLAM's instance-level scores, mahmoodlab/CLAM models/model_clam.py).

Zero-shot (Xu et al. 2024, Methods: slide-level vision-language alignment, MI-Zero): each class gets the L2-normalised
mean embedding of every template x synonym
prompt (gigapath_core/zeroshot.py); each tile token of the CLIP model's slide encoder is projected like the
slide embedding and L2-normalised; the tile score is its cosine similarity to the class embedding (-1..1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError


@dataclass
class TileScores:
    """Scores of every tile of one slide.

    Attributes:
        class_names: names of the score columns (binary: the positive class only).
        scores: (N, C) float32 tile class scores, unit ``score_unit``.
        attention: (N,) float32 attention weights (sum to 1 over the slide's tiles), or None (zero-shot).
        score_unit: what a score value means.
        slide_scores: (C,) float32 the slide-level prediction (probabilities; zero-shot: softmax over classes).
        source: provenance (model folder, folds, checkpoints, weights).
    """

    class_names: list[str]
    scores: np.ndarray
    attention: np.ndarray | None
    score_unit: str
    slide_scores: np.ndarray | None = None
    source: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ fine-tuned heads
@dataclass
class FoldModel:
    fold: int
    model: Any  # SlideClassifier
    checkpoint: Path


@dataclass
class HeadEnsemble:
    """Trained fold models of a finetune output folder; :meth:`score` averages them (the fold ensemble)."""

    run_dir: Path
    task: Any  # finetune.tasks.Task
    folds: list[FoldModel]

    def score(self, features: np.ndarray, grid_coords: np.ndarray) -> TileScores:
        """(N, D) float32 tile embeddings + (N, 2) grid px -> TileScores (mean over the folds).

        Raises ConfigError if the head has no attention (e.g. the ``linear`` head over a slide embedding).
        """
        att, tile_p, slide_p = [], [], []
        for fm in self.folds:
            a, tp, sp = fold_scores(fm.model, self.task, features, grid_coords)
            att.append(a)
            tile_p.append(tp)
            slide_p.append(sp)
        names = [self.task.class_names[1]] if self.task.type == "binary" else list(self.task.class_names)
        if tile_p[0].shape[1] == 0:  # the head has attention but no per-tile classifier
            names = []
        how = "sigmoid" if self.task.type != "multiclass" else "softmax over classes"
        return TileScores(
            class_names=names,
            scores=np.mean(tile_p, axis=0).astype(np.float32),
            attention=np.mean(att, axis=0).astype(np.float32),
            score_unit=f"probability ({how} of the head's classifier applied to the tile alone)",
            slide_scores=np.mean(slide_p, axis=0).astype(np.float32),
            source={"model": str(self.run_dir), "kind": "finetune", "folds": [f.fold for f in self.folds],
                    "checkpoints": [str(f.checkpoint) for f in self.folds], "task": self.task.type},
        )


def _tokens(model, feats: torch.Tensor, grid: torch.Tensor):
    """The inputs the head sees in ``SlideClassifier.forward``: (standardised features, tile tokens, slide)."""
    if model.standardizer is not None:
        feats = model.standardizer(feats)
    if model.slide_encoder is None:
        return feats, feats, None
    slide, tokens = model.slide_encoder(feats, grid, None, return_tile_tokens=True)
    return feats, tokens, slide


@torch.inference_mode()
def fold_scores(model, task, features: np.ndarray, grid_coords: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fold model on one slide -> (attention (N,), tile probabilities (N, C'), slide probabilities (C',))
    with C' = 1 for binary (the positive class). Raises ConfigError if the head has no ``attention``."""
    head = model.head
    check_attention_head(head)
    model.eval()
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
    grid = torch.from_numpy(np.ascontiguousarray(grid_coords, dtype=np.float32))[None]
    x, tokens, _ = _tokens(model, feats, grid)
    att = head.attention(tokens, None, tile_features=x)[0].float().numpy()
    slide_logits = model(feats, grid)
    if hasattr(head, "tile_logits"):
        tile_p = task.probs(head.tile_logits(tokens, None, tile_features=x)[0]).astype(np.float32)  # (N, C)
    else:
        tile_p = np.zeros((len(att), 0), dtype=np.float32)
    return att, tile_p, task.probs(slide_logits)[0].astype(np.float32)


def check_attention_head(head) -> None:
    """Raises ConfigError unless the head has ``attention(tokens, padding_mask, tile_features=...)``; tile class
    scores also need ``tile_logits`` (same signature; without it only the attention is drawn)."""
    if not hasattr(head, "attention"):
        raise ConfigError("--model", f"the {getattr(head, 'name', type(head).__name__)!r} head has no tile "
                          "attention to draw (heatmaps need an attention head such as abmil)")


def load_finetune_models(run_dir: str | Path, tile_dim: int, folds: str | int | Sequence[int] = "all"
                         ) -> HeadEnsemble:
    """Rebuild the trained fold models of a ``finetune`` output folder (``config.yaml`` + ``fold_<k>/
    checkpoints/step_*/model.safetensors``), as gigapath_core/finetune/build.py builds them.

    Args:
        tile_dim: width D of the tile embeddings the models take.
        folds: ``"all"`` (the ensemble), one fold index, or a list of fold indices.
    Raises:
        ConfigError: not a finetune output folder, a requested fold has no checkpoint, or the head has no
            attention (e.g. ``linear``).
    """
    import yaml
    from safetensors.torch import load_model

    from ..config import parse_model
    from ..finetune.config import FinetuneConfig
    from ..finetune.build import build_model
    from ..finetune.tasks import Task
    from ..training import latest_checkpoint

    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise ConfigError("--model", f"{run_dir} is not a finetune output folder (no config.yaml)")
    raw = yaml.safe_load(cfg_file.read_text())
    if raw.get("model", {}).get("slide_encoder"):
        raw["model"]["slide_encoder"]["weights"] = "random"  # every weight comes from the checkpoint
    cfg = parse_model(FinetuneConfig, raw)
    d = cfg.data
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        import json

        t = json.loads(metrics.read_text())["task"]
        task = Task(t["type"], tuple(t["classes"]), tuple(t["label_columns"]), bool(t.get("ordinal")))
    elif d.task == "multilabel":
        task = Task("multilabel", tuple(d.label_columns), tuple(d.label_columns))
    elif d.classes:
        task = Task(d.task, tuple(d.classes), tuple(d.label_columns), d.ordinal)
    else:
        raise ConfigError("--model", f"{run_dir} has no metrics.json and its config names no classes")
    fold_dirs = sorted(run_dir.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))
    wanted = [int(p.name.split("_")[1]) for p in fold_dirs] if folds == "all" else (
        [int(folds)] if isinstance(folds, (int, str)) else [int(f) for f in folds])
    shim = type("Data", (), {"tile_dim": int(tile_dim), "task": task})()
    out = []
    for k in wanted:
        ckpt = latest_checkpoint(run_dir / f"fold_{k}")
        if ckpt is None:
            raise ConfigError("--fold", f"{run_dir / f'fold_{k}'} has no checkpoint (folds with one: "
                              f"{[int(p.name.split('_')[1]) for p in fold_dirs if latest_checkpoint(p)]})")
        model = build_model(cfg, shim)
        check_attention_head(model.head)
        load_model(model, str(ckpt / "model.safetensors"), strict=True)
        out.append(FoldModel(k, model.eval(), ckpt))
    if not out:
        raise ConfigError("--model", f"{run_dir} has no trained folds (fold_<k>/checkpoints)")
    return HeadEnsemble(run_dir, task, out)


# ------------------------------------------------------------------------------------------ zero-shot CLIP
@dataclass
class ZeroShotScorer:
    """A trained CLIP objective plus one class embedding per class (every template x every synonym)."""

    objective: Any  # plugins ssl/clip.py SlideReportCLIP
    class_names: list[str]
    class_embeds: torch.Tensor  # (C, P) L2-normalised
    source: dict[str, Any]

    @torch.inference_mode()
    def score(self, features: np.ndarray, grid_coords: np.ndarray) -> TileScores:
        """(N, D) tile embeddings + (N, 2) grid px -> cosine similarity of every tile token to every class."""
        obj = self.objective.eval()
        feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))[None]
        grid = torch.from_numpy(np.ascontiguousarray(grid_coords, dtype=np.float32))[None]
        slide, tokens = obj.slide_encoder(feats, grid, None, return_tile_tokens=True)
        t = torch.nn.functional.normalize(obj.slide_proj(tokens[0].float()), dim=-1)
        s = torch.nn.functional.normalize(obj.slide_proj(slide.float()), dim=-1)
        cos = (t @ self.class_embeds.T).numpy().astype(np.float32)
        slide_p = torch.softmax(obj.scale() * s @ self.class_embeds.T, -1)[0].numpy().astype(np.float32)
        return TileScores(self.class_names, cos, None,
                          "cosine similarity of the tile token to the class prompts (-1..1)", slide_p,
                          dict(self.source))


def load_zeroshot_scorer(clip_dir: str | Path, classes: dict[str, Sequence[str]],
                         templates: Sequence[str] | None = None) -> ZeroShotScorer:
    """The CLIP objective of a ``clip`` output folder (``objective.json`` + latest checkpoint) and the class
    embeddings of ``classes`` (label -> synonyms) over ``templates`` (default: zeroshot.DEFAULT_TEMPLATES).

    Raises ConfigError if ``clip_dir`` is not a trained clip output.
    """
    import json

    from safetensors.torch import load_model

    from ..pretrain.jobs import OBJECTIVE_FILE, build_objective
    from ..training import latest_checkpoint
    from ..zeroshot import DEFAULT_TEMPLATES, class_embeddings

    clip_dir = Path(clip_dir)
    spec_file, ckpt = clip_dir / OBJECTIVE_FILE, latest_checkpoint(clip_dir)
    if not spec_file.is_file() or ckpt is None:
        raise ConfigError("--clip", f"{clip_dir} is not a trained clip output ({OBJECTIVE_FILE} + checkpoints/ "
                          "needed)")
    if not classes:
        raise ConfigError("--classes", "zero-shot heatmaps need at least one class")
    from ..config import StageConfig

    spec = json.loads(spec_file.read_text())
    objective = build_objective(StageConfig(name=spec["name"], params=spec.get("params", {})),
                                spec.get("registry", []))
    load_model(objective, str(ckpt / "model.safetensors"), strict=True)
    objective.eval()
    prompts = {label: [t.format(n) for n in names for t in (templates or DEFAULT_TEMPLATES)]
               for label, names in classes.items()}
    with torch.inference_mode():
        emb = class_embeddings(objective.encode_texts, prompts)
    return ZeroShotScorer(objective, list(classes), emb,
                          {"model": str(clip_dir), "kind": "zeroshot", "checkpoint": str(ckpt),
                           "prompts_per_class": {k: len(v) for k, v in prompts.items()}})
