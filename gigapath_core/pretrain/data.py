"""Data sources of the pretraining jobs and the deterministic view pipeline.

- :class:`TileSource`: tiles streamed from slides (open with the configured readers, tile with the tiler,
  read lazily with ``Tiler.read_tile``; each process keeps its own slide handles);
- :func:`load_slide_embeddings`: ``tile_embeddings.h5`` of the embed job or another tool's feature files, read
  by :func:`gigapath_core.interop.read_tile_features` (``features`` (N, D) float32, ``coords`` (N, 2) grid px);
- :func:`load_pairs`: slide–report pairs from a CSV (``slide_id, report[, region][, label]``), reports
  cleaned by a ``report_cleaner`` plugin, ``region`` = ``"x0 y0 x1 y1"`` grid px selecting the tiles whose
  top-left corner lies in ``[x0, x1) x [y0, y1)``;
- :class:`ViewDataset` / :func:`epoch_batches`: view ``i`` of epoch ``e`` is ``objective.view(sample,
  default_rng([seed, e, i]))`` and each micro-batch carries a ``seed`` for the global RNG of its forward
  pass (dropout, drop-path), so a resumed run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, SlideError

log = logging.getLogger("gigapath")
EMBEDDINGS_FILE = "tile_embeddings.h5"


# ------------------------------------------------------------------------------------------ tiles
class TileSource:
    """Tiles of several slides, indexed ``0..len-1`` (slide by slide, each in row-major tile order).

    Args:
        slides: ``(slide_id, path, mpp override or None)`` triples.
        readers: SlideReader names tried in order; tiler: a Tiler plugin.
        max_tiles_per_slide: keep a seeded random subset of each slide's tiles.
    Slides that cannot be opened or tiled are skipped with a warning (one bad slide never stops a run);
    raises SlideError if no tile is left at all.
    """

    def __init__(
        self,
        slides: list[tuple[str, str, float | None]],
        readers: list[str],
        tiler,
        max_tiles_per_slide: int | None = None,
        seed: int = 0,
    ):
        from ..progress import make_progress
        from ..stages.tiling import open_slide

        self.readers, self.tiler = readers, tiler
        self.grids: list[dict] = []
        index: list[np.ndarray] = []
        rng = np.random.default_rng(seed)
        progress = make_progress()
        task = progress.add_task("tiling", total=len(slides))
        with progress:
            grids = []
            for sid, path, mpp in slides:
                try:
                    with open_slide(path, readers) as wsi:
                        g = tiler.tile(wsi, (mpp, mpp) if mpp else None)  # keep the fields, not the thumbnail
                    grids.append(
                        (
                            sid,
                            path,
                            {"coords": g.coords, "level": g.level, "read_size": g.read_size, "tile_size": g.tile_size,
                             "reader": wsi.reader},
                        )
                    )
                except SlideError as err:
                    log.warning("skipping %s: %s", sid, err)
                progress.advance(task)
        for sid, path, grid in grids:
            keep = np.arange(len(grid["coords"]))
            if max_tiles_per_slide and len(keep) > max_tiles_per_slide:
                keep = np.sort(rng.choice(len(keep), max_tiles_per_slide, replace=False))
            if not len(keep):
                log.warning("skipping %s: no tissue tiles", sid)
                continue
            s = len(self.grids)
            self.grids.append({"slide_id": sid, "path": path, **grid, "coords": grid["coords"][keep]})
            index.append(np.stack([np.full(len(keep), s), np.arange(len(keep))], 1))
        if not index:
            raise SlideError(slides[0][1] if slides else "", "no slide gave any tile to train on")
        self.index = np.concatenate(index)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def slide_readers(self) -> list[str]:
        """The readers that opened the kept slides (in this process: DataLoader workers that read tiles must be
        started to suit them, :func:`gigapath_core.stages.worker_start.loader_context`)."""
        return sorted({g["reader"] for g in self.grids})

    def _wsi(self, s: int):
        from ..stages.tiling import open_slide

        if self._pid != os.getpid():  # a forked DataLoader worker: never share slide handles
            self._handles, self._pid = {}, os.getpid()
        if s not in self._handles:
            self._handles[s] = open_slide(self.grids[s]["path"], self.readers)
        return self._handles[s]

    def __getitem__(self, k: int) -> np.ndarray:
        """Tile ``k``: (tile_size, tile_size, 3) uint8 RGB at the grid's target mpp."""
        s, t = (int(v) for v in self.index[k])
        g = self.grids[s]
        return self.tiler.read_tile(self._wsi(s), g["coords"][t], g["level"], g["read_size"], g["tile_size"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


# ------------------------------------------------------------------------------------------ embeddings
def embedding_files(dir: str | None = None, files: list[str] = ()) -> dict[str, Path]:
    """slide_id -> tile-feature file from a folder (an embed output folder, or another tool's feature folder /
    CSV of paths, :class:`gigapath_core.interop.FeatureLocator`) or a list of paths/globs (slide_id = the folder
    of a ``tile_embeddings.h5``, else the file name without extension).

    Raises ConfigError (``embeddings.dir`` / ``embeddings.files[i]``) when nothing matches.
    """
    from ..interop import FeatureLocator

    found: dict[str, Path] = {}
    if dir is not None:
        if not Path(dir).exists():
            raise ConfigError("embeddings.dir", f"not found: {dir}")
        found = {sid: src.path for sid, src in FeatureLocator([dir], "embeddings.dir").all().items()}
        if not found:
            raise ConfigError("embeddings.dir", f"no */{EMBEDDINGS_FILE} (or other tool's feature file) under {dir} "
                              "(run the embed job first)")
    for i, pattern in enumerate(files):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise ConfigError(f"embeddings.files[{i}]", f"no file matches {pattern!r}")
        for m in matches:
            found[Path(m).parent.name if Path(m).name == EMBEDDINGS_FILE else Path(m).stem] = Path(m)
    return found


def load_slide_embeddings(paths: dict[str, Path], **read_options: Any) -> dict[str, dict[str, np.ndarray]]:
    """slide_id -> {"features": (N, D) float32, "coords": (N, 2) float32 grid px}; empty slides dropped.

    Each file is read by :func:`gigapath_core.interop.read_tile_features` (ours of either format version, or
    another tool's, with ``read_options``); ``coords`` here are its checked ``grid_coords``.

    Raises ConfigError if the files disagree on D or their units cannot be worked out; FeatureFileError for a
    file without ``features``/``coords`` or with non-finite values.
    """
    from ..interop import read_tile_features

    read_options.setdefault("key_prefix", "embeddings.")
    out: dict[str, dict[str, np.ndarray]] = {}
    dims = set()
    for sid, path in paths.items():
        tf = read_tile_features(path, **read_options)
        if len(tf) == 0:
            log.warning("skipping %s: no tiles", sid)
            continue
        out[sid] = {"features": tf.features, "coords": tf.grid_coords.astype(np.float32)}
        dims.add(tf.dim)
    if len(dims) > 1:
        raise ConfigError("embeddings", f"tile embeddings of different widths {sorted(dims)} (mixed tile encoders?)")
    if not out:
        raise ConfigError("embeddings", "no slide with tile embeddings")
    return out


def parse_region(text: str, where: str) -> tuple[float, float, float, float] | None:
    """``"x0 y0 x1 y1"`` grid px (spaces or commas) -> tuple, "" -> None. Raises ConfigError naming ``where``."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise ConfigError(where, f"region {text!r} is not 'x0 y0 x1 y1' (grid px)") from None
    if x1 <= x0 or y1 <= y0:
        raise ConfigError(where, f"region {text!r} is empty (need x0 < x1 and y0 < y1)")
    return x0, y0, x1, y1


def select_region(slide: dict[str, np.ndarray], region, where: str) -> dict[str, np.ndarray]:
    """The tiles of ``slide`` whose top-left corner lies in ``region`` (all if None)."""
    if region is None:
        return slide
    x0, y0, x1, y1 = region
    c = slide["coords"]
    keep = (c[:, 0] >= x0) & (c[:, 0] < x1) & (c[:, 1] >= y0) & (c[:, 1] < y1)
    if not keep.any():
        raise ConfigError(where, f"region {region} holds no tile of the slide")
    return {"features": slide["features"][keep], "coords": slide["coords"][keep]}


def load_pairs(
    csv_path: str | Path, slides: dict[str, dict], cleaner=None, text_column: str = "report", require_text: bool = True
) -> list[dict]:
    """Rows of a pairs/labels CSV -> ``[{"slide_id", "region", "text", "label", "features", "coords"}]``.

    ``text`` is the report after ``cleaner.clean_all`` (if given; a report the cleaner fails on is used as it
    is, with a warning). Raises ConfigError naming the file and row
    for a missing column, an unknown slide_id, a bad region or a report that is empty after cleaning.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = ["slide_id"] + ([text_column] if require_text else ["label"])
    if not rows:
        raise ConfigError(str(csv_path), "no rows")
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise ConfigError(str(csv_path), f"missing column(s) {', '.join(missing)} (has {', '.join(rows[0])})")
    checked = []  # every row is checked before any report is cleaned (an LLM cleaner sends them off)
    for j, row in enumerate(rows):
        where = f"{csv_path.name}[row {j + 2}]"
        sid = row["slide_id"].strip()
        if sid not in slides:
            raise ConfigError(where, f"slide_id {sid!r} has no tile embeddings (known: {', '.join(sorted(slides))})")
        region = parse_region(row.get("region", ""), where)
        checked.append((where, sid, region, select_region(slides[sid], region, where)))
    texts = [(row.get(text_column) or "").strip() for row in rows]
    if cleaner is not None:  # all at once: an LLM cleaner sends them concurrently and caches the answers
        idx = [j for j, t in enumerate(texts) if t]
        results = dict(zip(idx, cleaner.clean_all([texts[j] for j in idx])))
        failed = [j for j, r in results.items() if r.status != "ok"]
        if failed:
            log.warning("%s: %d report(s) could not be cleaned and are used as they are (rows %s): %s",
                        csv_path.name, len(failed), ", ".join(str(j + 2) for j in failed[:10]),
                        results[failed[0]].reason)
        texts = [results[j].text.strip() if j in results else "" for j in range(len(texts))]
    out = []
    for (where, sid, region, sel), row, text in zip(checked, rows, texts):
        if require_text and not text:
            raise ConfigError(where, "report is empty (after cleaning)")
        out.append({"slide_id": sid, "region": region, "text": text, "label": (row.get("label") or "").strip(), **sel})
    return out


# ------------------------------------------------------------------------------------------ views
class ViewDataset(Dataset):
    """Item ``i`` of epoch ``e`` = ``view(sample(order_e[i]), default_rng([seed, e, i]))``; ``order_e`` is a
    seeded permutation (``shuffle``) or the identity."""

    def __init__(self, sample: Callable[[int], Any], n: int, view: Callable, seed: int = 0, shuffle: bool = True):
        self.sample, self.n, self.view, self.seed, self.shuffle = sample, n, view, seed, shuffle
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order = (
            np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.view(self.sample(int(self.order[i])), np.random.default_rng([self.seed, self.epoch, i]))


def epoch_batches(
    ds: ViewDataset,
    batch_size: int,
    collate: Callable,
    num_workers: int = 0,
    drop_last: bool = True,
    readers: list[str] = (),
) -> Callable[[int], Iterator[dict]]:
    """``batches(epoch)`` for :meth:`Trainer.fit`: collated micro-batches, each with a ``seed`` (int).

    ``readers``: the slide readers the dataset reads tiles with (:attr:`TileSource.slide_readers`; empty for
    embeddings). With ``num_workers`` > 0 they choose how the workers start, as in the tile-embedding stage:
    forked when every reader is fork-safe, from a forkserver otherwise (a forked worker of a process that has
    used libvips waits forever on its first read; :mod:`gigapath_core.stages.worker_start`).
    """
    from ..stages.worker_start import loader_context

    context = loader_context(readers) if num_workers and readers else None

    def batches(epoch: int) -> Iterator[dict]:
        ds.set_epoch(epoch)
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate,
            drop_last=drop_last,
            persistent_workers=False,
            multiprocessing_context=context,
        )
        for i, batch in enumerate(loader):
            batch["seed"] = int(np.random.default_rng([ds.seed, epoch, i, 7]).integers(2**62))
            yield batch

    return batches


def n_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def seeded_step(objective: torch.nn.Module) -> Callable[[torch.nn.Module, dict], dict]:
    """``step_fn`` for the Trainer: seed the global RNG from the batch, then ``model(batch)``."""

    def step(model, batch: dict) -> dict:
        batch = dict(batch)
        torch.manual_seed(batch.pop("seed"))
        return model(batch)

    return step
