"""Pre-flight of the ``finetune`` job: every check that needs only the config, the data files and the output
folder, run before anything is written.

``gigapath run`` and ``gigapath validate`` both call :func:`prepare_finetune` (the ``ablation`` job calls
:func:`check_finetune` per variant), so ``validate`` reports exactly the errors ``run`` would report before its
first write, and a config error never leaves a half-made output folder behind. The checks, in order:

1. the config itself (:func:`.config.load_finetune_config`: keys, types, paths, plugin names and params);
2. the data (:func:`.data.load_data`): labels CSV columns and values, the task, the tile embeddings;
3. the folds: made (too few patients for ``folds.k``...) or read from ``folds.splits`` and checked against
   the data;
4. the output folder: a fold folder holding training of another config or other folds is refused (a fold
   folder whose run never trained anything, no checkpoint and no ``status.json``, is not);
5. if some fold is left to train: ``train.device``, then the model built with random weights (no weights are
   read: every width and ``num_classes`` check of :func:`.build.build_model`) and one forward pass on one
   training slide (:func:`.build.check_forward`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..evaluation.folds import Splits, make_folds, read_splits, splits_csv
from ..store import read_status
from .config import FinetuneConfig, load_finetune_config
from .data import FinetuneData, load_data

FOLD_MARKER = "fingerprint.txt"  # OUT/fold_<k>/fingerprint.txt: the run fingerprint of the training in it


@dataclass
class Checked:
    """What the pre-flight found, for the run to use as is.

    Attributes:
        cfg: the config checked (the ablation's variants with the shared ``folds.splits`` filled in).
        data: the labelled slides and their tile embeddings.
        splits: the folds (made, read, or the ablation's shared ones).
        fingerprint: ``<config>-<labels CSV>-<folds>`` hashes, written into each fold folder and status.
        todo: indices of the folds left to train (the others were finished by an earlier run of the same
            fingerprint and are reused).
    """

    cfg: FinetuneConfig
    data: FinetuneData
    splits: Splits
    fingerprint: str
    todo: list[int] = field(default_factory=list)


def choose_splits(cfg: FinetuneConfig, data: FinetuneData, splits: Splits | None = None,
                  source: str | None = None) -> Splits:
    """The folds of the run, written nowhere: ``splits`` if given, else ``folds.splits`` read, else made
    (patient-grouped, stratified). Given or read folds are checked against the data.

    ``source``: how the messages name given ``splits`` (default: ``folds.splits``' path).
    Raises ConfigError if the folds and the data disagree on slides or patients, or the folds cannot be made.
    """
    if splits is None and cfg.folds.splits:
        splits = read_splits(cfg.folds.splits)
    if splits is None:
        ids = data.ids()
        return make_folds(ids, [data.slides[s].patient_id for s in ids],
                          [data.task.stratum(data.slides[s].target) for s in ids],
                          cfg.folds.k, cfg.folds.seed, cfg.folds.val_fraction)
    source = source or str(cfg.folds.splits)
    have, want = set(splits.patients), set(data.slides)
    for sid in sorted(have - want):
        why = data.excluded.get(sid, "not in the labels CSV")
        raise ConfigError("folds.splits", f"slide {sid!r} of {source} is not in the data ({why})")
    for sid in sorted(want - have):
        raise ConfigError("folds.splits", f"slide {sid!r} has labels and embeddings but is not in {source}")
    for sid, pid in splits.patients.items():
        if data.slides[sid].patient_id != pid:
            raise ConfigError("folds.splits", f"slide {sid!r} belongs to patient {data.slides[sid].patient_id!r} "
                              f"in the labels but to {pid!r} in {source}")
    return splits


def run_fingerprint(cfg: FinetuneConfig, splits: Splits) -> str:
    """``<config>-<labels CSV bytes>-<folds>`` hashes: equal fingerprints give the same results."""
    labels_hash = hashlib.sha1(Path(cfg.data.labels).read_bytes()).hexdigest()[:12]
    splits_hash = hashlib.sha1(splits_csv(splits).encode()).hexdigest()[:12]
    return f"{cfg.fingerprint()}-{labels_hash}-{splits_hash}"


def fold_done(fold_dir: Path, fingerprint: str) -> bool:
    """True if ``fold_dir`` holds the finished fold of this fingerprint (``status.json`` ok, predictions written).

    Raises ConfigError (``output``) if it holds training of another fingerprint (its ``fingerprint.txt``
    differs and it has a checkpoint or a ``status.json``). A ``fingerprint.txt`` alone, left by a run that
    stopped before training, does not count: the fold is trained anew.
    """
    from ..training import latest_checkpoint

    status = read_status(fold_dir)
    if status and status.get("status") == "ok" and status.get("fingerprint") == fingerprint \
            and (fold_dir / "predictions.csv").is_file():
        return True
    marker = fold_dir / FOLD_MARKER
    if marker.is_file() and marker.read_text().strip() != fingerprint \
            and (status is not None or latest_checkpoint(fold_dir) is not None):
        raise ConfigError("output", f"{fold_dir} holds a run with a different config or different folds; "
                          "use another output folder (or delete that one)")
    return False


def check_device(name: str) -> None:
    """Raises ConfigError (``train.device``) if the training device is not there."""
    from ..pipeline import resolve_device

    try:
        resolve_device(name)
    except ConfigError as err:
        raise ConfigError("train.device", str(err).split(": ", 1)[-1]) from None


def check_model(cfg: FinetuneConfig, data: FinetuneData, slide_id: str) -> None:
    """Build the model with random weights (no weights read; the config's widths and ``num_classes`` are
    checked) and run one forward pass on ``slide_id``. Raises ConfigError."""
    from ..weights import random_weights_said_elsewhere
    from .build import build_model, check_forward

    with random_weights_said_elsewhere():  # the run says which weights it loads when it builds its own model
        model = build_model(cfg, data, random_weights=True)
    check_forward(model, data, slide_id)


def check_finetune(cfg: FinetuneConfig, data: FinetuneData | None = None, splits: Splits | None = None,
                   splits_source: str | None = None) -> Checked:
    """Every check of a validated config that needs the data files and the output folder (steps 2-5 of the
    module docstring). Reads, never writes.

    Args:
        data: the data if already loaded for ``cfg.data`` (the ablation shares it between variants).
        splits, splits_source: folds given by the caller (the ablation's shared folds) and how messages name them.
    Raises:
        ConfigError: the first problem, with its key path (``data.label_columns``, ``folds.k``,
            ``model.head.params.num_classes``, ``output``, ``train.device``, ``model``...).
    """
    data = data if data is not None else load_data(cfg.data)
    splits = choose_splits(cfg, data, splits, splits_source)
    fingerprint = run_fingerprint(cfg, splits)
    out = Path(cfg.output)
    todo = [f for f in range(splits.k) if not fold_done(out / f"fold_{f}", fingerprint)]
    for f in todo:
        if not splits.folds[f]["train"]:
            raise ConfigError("folds.splits", f"fold_{f} of {splits_source or cfg.folds.splits} has no training slides")
    if todo:
        check_device(cfg.train.device)
        check_model(cfg, data, splits.folds[todo[0]]["train"][0])
    return Checked(cfg, data, splits, fingerprint, todo)


def prepare_finetune(raw: dict, base: Path, out: str | None) -> Checked:
    """Load and check a finetune config (``gigapath run`` and ``gigapath validate``). Raises ConfigError."""
    return check_finetune(load_finetune_config(raw, base, out))
