"""Patient-grouped, label-stratified k-fold splits (Xu et al. 2024, Methods: mutation prediction, cancer subtyping:
k-fold cross-validation, one patient never on both
sides of a split), written to and read from a CSV so other runs (ablation variants) reuse the same folds.

Splits file (long format, one row per slide and fold)::

    fold,split,slide_id,patient_id
    0,train,S01,P01
    0,test,S07,P04
    ...

``split`` is ``train``, ``val`` or ``test``. Every slide is in the test split of exactly one fold.
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

from ..errors import ConfigError

log = logging.getLogger("gigapath")
SPLIT_NAMES = ("train", "val", "test")
SPLITS_FIELDS = ["fold", "split", "slide_id", "patient_id"]


@dataclass
class Splits:
    """Train/val/test slide ids per fold.

    Attributes:
        folds: one ``{"train": [...], "val": [...], "test": [...]}`` per fold (slide ids, sorted).
        patients: slide_id -> patient_id.
        k, seed: how they were made (``seed`` is None for splits read from a file).
    """

    folds: list[dict[str, list[str]]]
    patients: dict[str, str]
    k: int
    seed: int | None = None
    info: dict = field(default_factory=dict)

    def slides(self) -> list[str]:
        return sorted(self.patients)


def _check_inputs(slide_ids: Sequence[str], patient_ids: Sequence[str], strata: Sequence[Hashable]) -> None:
    if not (len(slide_ids) == len(patient_ids) == len(strata)):
        raise ValueError("slide_ids, patient_ids and strata must have the same length")
    dup = [s for s, n in Counter(slide_ids).items() if n > 1]
    if dup:
        raise ConfigError("data.labels", f"slide_id {dup[0]!r} appears {Counter(slide_ids)[dup[0]]} times")


def _sgkf(n_splits: int, seed: int, y: np.ndarray, groups: np.ndarray, key: str = "folds.k"):
    """scikit-learn's StratifiedGroupKFold splits. Raises ConfigError (``key``) where it cannot stratify: every
    class has fewer slides than parts (scikit-learn's ValueError, said in our words)."""
    from sklearn.model_selection import StratifiedGroupKFold

    counts = Counter(y.tolist())
    if all(c < n_splits for c in counts.values()):
        raise ConfigError(key, f"{n_splits} label-stratified parts need at least {n_splits} slides of one class; "
                          f"the slides per class are {', '.join(str(c) for _, c in sorted(counts.items()))}")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parts = list(cv.split(np.zeros(len(y)), y, groups))
    for w in caught:  # e.g. "The least populated class in y has only 3 members" -> a log line, not a traceback
        log.warning("folds: %s", w.message)
    return parts


def make_folds(slide_ids: Sequence[str], patient_ids: Sequence[str], strata: Sequence[Hashable], k: int = 5,
               seed: int = 0, val_fraction: float = 0.0) -> Splits:
    """Split slides into ``k`` folds with scikit-learn's ``StratifiedGroupKFold`` (groups = patients).

    Args:
        slide_ids: N unique slide ids.
        patient_ids: N patient ids; all slides of a patient land in the same split of every fold.
        strata: N labels to balance across folds (class name; for multi-label, the label vector as a string).
        k: number of folds (each fold's test set is one part).
        seed: shuffling seed; the same inputs and seed give the same folds (input order does not matter).
        val_fraction: share of each fold's training patients held out as ``val`` (0 = no validation set),
            chosen with a second, inner ``StratifiedGroupKFold`` of ``round(1 / val_fraction)`` parts.
    Returns:
        Splits.
    Raises:
        ConfigError: fewer patients than folds (``folds.k``), too few training patients for the validation
            split (``folds.val_fraction``), or a duplicated slide id.
    """
    _check_inputs(slide_ids, patient_ids, strata)
    order = np.argsort(np.asarray(slide_ids, dtype=object).astype(str), kind="stable")
    sids = np.asarray(slide_ids, dtype=object)[order].astype(str)
    pids = np.asarray(patient_ids, dtype=object)[order].astype(str)
    y = np.asarray([str(s) for s in np.asarray(strata, dtype=object)[order]])
    n_patients = len(set(pids))
    if k < 2:
        raise ConfigError("folds.k", f"need at least 2 folds, got {k}")
    if n_patients < k:
        raise ConfigError("folds.k", f"{k} folds need at least {k} patients; the labels have {n_patients}")
    folds = []
    for fold, (train_idx, test_idx) in enumerate(_sgkf(k, seed, y, pids)):
        val_idx = np.array([], dtype=int)
        if val_fraction > 0:
            n_inner = max(2, round(1 / val_fraction))
            n_train_patients = len(set(pids[train_idx]))
            if n_train_patients < n_inner:
                raise ConfigError("folds.val_fraction", f"val_fraction {val_fraction} needs {n_inner} training "
                                  f"patients per fold; fold_{fold} has {n_train_patients}")
            inner_train, inner_val = _sgkf(n_inner, seed + 1000 + fold, y[train_idx], pids[train_idx],
                                            "folds.val_fraction")[0]
            val_idx, train_idx = train_idx[inner_val], train_idx[inner_train]
        folds.append({"train": sorted(sids[train_idx]), "val": sorted(sids[val_idx]), "test": sorted(sids[test_idx])})
    splits = Splits(folds, dict(zip(sids, pids)), k, seed, {"val_fraction": val_fraction})
    check_splits(splits)
    return splits


def check_splits(splits: Splits, source: str = "folds") -> None:
    """Raise ConfigError if a patient is in two splits of a fold, a slide is in two splits of a fold, or a slide
    is not in the test split of exactly one fold. ``source`` names the file or key in the message."""
    tested: Counter = Counter()
    for f, parts in enumerate(splits.folds):
        seen: dict[str, str] = {}
        owner: dict[str, str] = {}
        for split in SPLIT_NAMES:
            for sid in parts.get(split, []):
                if sid in seen:
                    raise ConfigError(source, f"fold_{f}: slide {sid!r} is in both {seen[sid]} and {split}")
                seen[sid] = split
                pid = splits.patients[sid]
                if owner.setdefault(pid, split) != split:
                    raise ConfigError(source, f"fold_{f}: patient {pid!r} has slides in both {owner[pid]} and "
                                      f"{split} (folds must be grouped by patient)")
        tested.update(parts.get("test", []))
    for sid in splits.patients:
        if tested[sid] != 1:
            raise ConfigError(source, f"slide {sid!r} is in the test split of {tested[sid]} folds (expected 1)")


def splits_csv(splits: Splits) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SPLITS_FIELDS)
    for f, parts in enumerate(splits.folds):
        for split in SPLIT_NAMES:
            for sid in parts.get(split, []):
                w.writerow([f, split, sid, splits.patients[sid]])
    return buf.getvalue()


def write_splits(path: str | Path, splits: Splits) -> None:
    """Write the splits CSV atomically (see the module docstring for the format)."""
    from ..store import write_bytes

    write_bytes(path, splits_csv(splits).encode())


def read_splits(path: str | Path, key: str = "folds.splits") -> Splits:
    """Read and check a splits CSV written by :func:`write_splits` (or by hand in the same format).

    Raises:
        ConfigError (``key``): missing file, missing columns, bad fold/split values, or a patient split
            across train/val/test of a fold.
    """
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ConfigError(key, f"splits file not found: {path}") from None
    if not rows or set(SPLITS_FIELDS) - set(rows[0]):
        have = ", ".join(rows[0]) if rows else "no rows"
        raise ConfigError(key, f"{path} needs columns {', '.join(SPLITS_FIELDS)} (has {have})")
    patients: dict[str, str] = {}
    by_fold: dict[int, dict[str, list[str]]] = {}
    for i, row in enumerate(rows):
        where = f"{path} row {i + 2}"
        try:
            fold = int(row["fold"])
        except ValueError:
            raise ConfigError(key, f"{where}: fold must be an integer, got {row['fold']!r}") from None
        if row["split"] not in SPLIT_NAMES:
            raise ConfigError(key, f"{where}: split must be one of {', '.join(SPLIT_NAMES)}, got {row['split']!r}")
        sid, pid = row["slide_id"], row["patient_id"]
        if patients.setdefault(sid, pid) != pid:
            raise ConfigError(key, f"{where}: slide {sid!r} has two patient ids ({patients[sid]!r}, {pid!r})")
        by_fold.setdefault(fold, {s: [] for s in SPLIT_NAMES})[row["split"]].append(sid)
    k = len(by_fold)
    if sorted(by_fold) != list(range(k)):
        raise ConfigError(key, f"{path}: folds must be numbered 0..{k - 1}, got {sorted(by_fold)}")
    folds = [{s: sorted(v) for s, v in by_fold[f].items()} for f in range(k)]
    splits = Splits(folds, patients, k, None, {"file": str(path)})
    check_splits(splits, f"{key} ({path})")
    return splits


def fold_sizes(splits: Splits) -> list[dict[str, int]]:
    """Number of slides per split of each fold (for logs and metrics.json)."""
    return [{s: len(parts.get(s, [])) for s in SPLIT_NAMES} for parts in splits.folds]


__all__ = ["Splits", "make_folds", "check_splits", "write_splits", "read_splits", "fold_sizes"]
