"""Task types of slide-level fine-tuning: how labels become targets, which loss, which probabilities (Xu et al. 2024,
Methods: mutation prediction, cancer subtyping).

- ``binary``: one label column with two values; one logit; BCE-with-logits; P(positive) = sigmoid.
  ``class_names = [negative, positive]``.
- ``multiclass``: one label column with C values; C logits; cross-entropy; softmax. ``ordinal`` adds the
  quadratic-weighted kappa to the metrics (class order = ``class_names``).
- ``multilabel``: L label columns of 0/1 (e.g. 5 genes, 18 biomarkers); L logits; BCE-with-logits; sigmoids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError

TRUE_VALUES, FALSE_VALUES = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}


@dataclass(frozen=True)
class Task:
    """Attributes: ``type`` (binary|multiclass|multilabel), ``class_names`` (classes or labels, in output
    order), ``label_columns`` (CSV columns), ``ordinal``."""

    type: str
    class_names: tuple[str, ...]
    label_columns: tuple[str, ...]
    ordinal: bool = False

    @property
    def num_outputs(self) -> int:
        """Number of logits the head must produce: 1 for binary, else the number of classes/labels."""
        return 1 if self.type == "binary" else len(self.class_names)

    def encode(self, row: dict[str, str], where: str) -> int | np.ndarray:
        """Labels CSV row -> target: class index (binary, multiclass) or (L,) int64 0/1 (multilabel).

        Raises ConfigError (``data.labels``) naming ``where`` (file and row) for an unknown or empty value.
        """
        if self.type == "multilabel":
            out = np.zeros(len(self.label_columns), dtype=np.int64)
            for j, col in enumerate(self.label_columns):
                v = (row.get(col) or "").strip().lower()
                if v not in TRUE_VALUES | FALSE_VALUES:
                    raise ConfigError("data.labels", f"{where}: column {col!r} must be 0 or 1, got {row.get(col)!r}")
                out[j] = int(v in TRUE_VALUES)
            return out
        v = (row.get(self.label_columns[0]) or "").strip()
        if v not in self.class_names:
            raise ConfigError("data.labels", f"{where}: label {v!r} in column {self.label_columns[0]!r} is not one "
                              f"of the classes {list(self.class_names)}")
        return self.class_names.index(v)

    def stratum(self, target) -> str:
        """Value folds are stratified on (the class, or the label vector for multilabel)."""
        return "".join(str(int(t)) for t in target) if self.type == "multilabel" else str(int(target))

    def target_tensor(self, target) -> torch.Tensor:
        if self.type == "multiclass":
            return torch.tensor([int(target)], dtype=torch.long)
        return torch.as_tensor(np.asarray(target, dtype=np.float32).reshape(1, -1))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (B, num_outputs) float; target from :meth:`target_tensor` -> scalar loss."""
        logits = logits.float()
        if self.type == "multiclass":
            return F.cross_entropy(logits, target)
        return F.binary_cross_entropy_with_logits(logits, target.reshape(logits.shape))

    def probs(self, logits: torch.Tensor) -> np.ndarray:
        """logits (B, num_outputs) -> (B, num_outputs) float64 probabilities (softmax or sigmoid)."""
        logits = logits.float()
        p = torch.softmax(logits, -1) if self.type == "multiclass" else torch.sigmoid(logits)
        return p.detach().cpu().double().numpy()


def make_task(task_type: str, label_columns: Sequence[str], values: Sequence[Sequence[str]],
              classes: Sequence[str] | None = None, ordinal: bool = False) -> Task:
    """Build the Task from the config and the label values found in the CSV.

    Args:
        values: per label column, the values of every row.
        classes: class order (binary: [negative, positive]); default: sorted distinct values.
    Raises:
        ConfigError: wrong number of label columns or classes, ordinal without explicit classes.
    """
    cols = tuple(label_columns)
    if task_type == "multilabel":
        if classes is not None:
            raise ConfigError("data.classes", "multilabel tasks take their label names from data.label_columns")
        return Task("multilabel", cols, cols)
    if len(cols) != 1:
        raise ConfigError("data.label_columns", f"a {task_type} task takes exactly one label column, got {len(cols)}")
    found = sorted({v.strip() for v in values[0] if v.strip()})
    if classes is None:
        if ordinal:
            raise ConfigError("data.classes", "ordinal tasks need data.classes in their order (lowest first)")
        classes = found
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
        raise ConfigError("data.classes", f"duplicate class names in {list(classes)}")
    unknown = [v for v in found if v not in classes]
    if unknown:
        raise ConfigError("data.classes",
                          f"labels {unknown} in column {cols[0]!r} are not in data.classes {list(classes)}")
    if task_type == "binary" and len(classes) != 2:
        raise ConfigError("data.classes" if len(found) == 2 else "data.label_columns",
                          f"a binary task needs exactly 2 classes, got {list(classes)}")
    if task_type == "multiclass" and len(classes) < 2:
        raise ConfigError("data.label_columns", f"a multiclass task needs at least 2 classes, got {list(classes)}")
    return Task(task_type, classes, cols, ordinal)
