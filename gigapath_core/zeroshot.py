"""Zero-shot slide classification with class prompts (MI-Zero protocol; Lu et al., CVPR 2023; Xu et al. 2024, Methods:
slide-level vision-language alignment).

A *prompt set* draws, for every class, one class name among its synonyms and a random subset of the
templates (size uniform in 1..T, shared by all classes); a class's text embedding is the L2-normalised mean
of its prompts' normalised embeddings. Each slide gets class probabilities
``softmax(logit_scale * slide @ class_embeddings.T)`` (rows sum to 1). The protocol repeats this for
``n_sets`` (50) random prompt sets and reports balanced accuracy, precision and F1 (scikit-learn) as
mean ± standard error of the mean (scipy) over the sets.

Mutation prediction uses the same machinery with the classes ``"<GENE> mutated"`` / ``"<GENE> wild-type"``
(:func:`mutation_classes`), the cancer name optionally appended (Prov-GigaPath, "Slide-level
vision–language alignment").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

#: default templates ("{}" = class name), written for H&E and IHC slide-level prompts
DEFAULT_TEMPLATES = (
    "{}.",
    "{} is present.",
    "this slide shows {}.",
    "a whole slide image of {}.",
    "a histology slide of {}.",
    "an H&E stained slide of {}.",
    "a microscopy image showing {}.",
    "histopathology of {}.",
    "pathology slide: {}.",
    "tissue section with {}.",
    "diagnosis: {}.",
    "findings consistent with {}.",
    "a slide diagnosed as {}.",
    "microscopic examination shows {}.",
    "sections demonstrate {}.",
    "an example of {}.",
)


def mutation_classes(
    gene: str, cancer: str | None = None, labels: tuple[str, str] = ("mutated", "wild-type")
) -> dict[str, list[str]]:
    """Class names for mutation prediction: ``{labels[0]: ["EGFR mutated", ...], labels[1]: ["EGFR
    wild-type", ...]}``; with ``cancer`` each name is followed by it ("EGFR mutated lung adenocarcinoma")."""
    mutated = [f"{gene} mutated", f"{gene}-mutant", f"{gene} mutation"]
    wild = [f"{gene} wild-type", f"{gene} wild type", f"{gene}-negative"]
    if cancer:
        mutated = [f"{n} {cancer}" for n in mutated]
        wild = [f"{n} {cancer}" for n in wild]
    return {labels[0]: mutated, labels[1]: wild}


def sample_prompt_sets(
    classes: dict[str, Sequence[str]], templates: Sequence[str] = DEFAULT_TEMPLATES, n_sets: int = 50, seed: int = 0
) -> list[dict[str, list[str]]]:
    """``n_sets`` random prompt sets: label -> prompts (one class name x a random template subset).

    Raises ValueError if a template has no ``{}`` or a class has no name.
    """
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder")
    for label, names in classes.items():
        if not names:
            raise ValueError(f"class {label!r} has no class name")
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n_sets):
        k = int(rng.integers(1, len(templates) + 1))
        chosen = [templates[i] for i in rng.choice(len(templates), size=k, replace=False)]
        names = {label: names[int(rng.integers(len(names)))] for label, names in classes.items()}
        sets.append({label: [t.format(names[label]) for t in chosen] for label in classes})
    return sets


def class_embeddings(
    encode_texts: Callable[[list[str]], torch.Tensor], prompt_set: dict[str, list[str]]
) -> torch.Tensor:
    """(C, P) L2-normalised class embeddings: normalised mean of each class's normalised prompt embeddings."""
    rows = []
    for prompts in prompt_set.values():
        e = torch.nn.functional.normalize(encode_texts(list(prompts)).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def cached_encoder(
    encode_texts: Callable[[list[str]], torch.Tensor], prompts: Sequence[str], batch_size: int = 64
) -> Callable[[list[str]], torch.Tensor]:
    """Encode each distinct prompt once (in batches) and serve later calls from that table: the 50 prompt
    sets reuse the same few dozen prompts."""
    unique = list(dict.fromkeys(prompts))
    table: dict[str, torch.Tensor] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        for text, emb in zip(chunk, encode_texts(chunk).float()):
            table[text] = emb
    return lambda texts: torch.stack([table[t] if t in table else encode_texts([t]).float()[0] for t in texts])


def class_probabilities(
    slide_embeds: torch.Tensor, class_embeds: torch.Tensor, logit_scale: float = 100.0
) -> torch.Tensor:
    """(S, P) slide embeddings x (C, P) class embeddings -> (S, C) probabilities (softmax of scaled cosines)."""
    s = torch.nn.functional.normalize(slide_embeds.float(), dim=-1)
    c = torch.nn.functional.normalize(class_embeds.float(), dim=-1)
    return torch.softmax(float(logit_scale) * s @ c.T, dim=-1)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], n_classes: int, average: str = "macro"
) -> dict:
    """Balanced accuracy, precision and F1 from scikit-learn (zero_division=0)."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score

    labels = list(range(n_classes))
    kw = {"average": average, "zero_division": 0}
    if average != "binary":
        kw["labels"] = labels
    return {
        "bacc": float(balanced_accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, **kw)),
        "f1": float(f1_score(y_true, y_pred, **kw)),
    }


@dataclass
class ZeroShotResult:
    """Outcome of :func:`zero_shot`.

    Attributes:
        labels: class labels in column order.
        probs: (n_sets, S, C) float per prompt set; ``probs.mean(0)`` is the ensemble (rows still sum to 1).
        per_set: metrics of every prompt set (when true labels were given).
        summary: metric -> {"mean", "sem"} over prompt sets (scipy.stats.sem; 0 for one set).
        prompt_sets: the prompts used.
    """

    labels: list[str]
    probs: np.ndarray
    per_set: list[dict] = field(default_factory=list)
    summary: dict[str, dict[str, float]] = field(default_factory=dict)
    prompt_sets: list[dict[str, list[str]]] = field(default_factory=list)


@torch.inference_mode()
def zero_shot(
    slide_embeds: torch.Tensor,
    encode_texts: Callable[[list[str]], torch.Tensor],
    classes: dict[str, Sequence[str]],
    y_true: Sequence[str] | None = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    n_sets: int = 50,
    seed: int = 0,
    logit_scale: float = 100.0,
    average: str = "macro",
) -> ZeroShotResult:
    """Run the protocol on (S, P) slide embeddings.

    Args:
        encode_texts: B strings -> (B, P) text embeddings in the slide embeddings' space.
        classes: label -> class-name synonyms.
        y_true: optional true label of each slide (values among ``classes``' keys).
    Raises:
        ValueError: a true label that is not a class.
    """
    from scipy.stats import sem

    labels = list(classes)
    sets = sample_prompt_sets(classes, templates, n_sets, seed)
    encode = cached_encoder(encode_texts, [p for ps in sets for prompts in ps.values() for p in prompts])
    probs = np.stack(
        [class_probabilities(slide_embeds, class_embeddings(encode, ps), logit_scale).cpu().numpy() for ps in sets]
    )
    result = ZeroShotResult(labels=labels, probs=probs, prompt_sets=sets)
    if y_true is not None:
        unknown = sorted(set(y_true) - set(labels))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {labels}")
        y = [labels.index(v) for v in y_true]
        result.per_set = [classification_metrics(y, p.argmax(1), len(labels), average) for p in probs]
        for m in ("bacc", "precision", "f1"):
            vals = np.array([r[m] for r in result.per_set])
            result.summary[m] = {"mean": float(vals.mean()), "sem": float(sem(vals)) if len(vals) > 1 else 0.0}
    return result
