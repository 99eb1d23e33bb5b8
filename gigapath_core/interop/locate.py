"""Where a slide's tile features are: our run folders, other tools' folder layouts, or a CSV of paths.

A *features source* is a folder or a CSV file:

- folder layouts tried for slide ``S``, in order: ``<folder>/S/tile_embeddings.h5`` (our embed run),
  ``<folder>/S.h5`` (TRIDENT ``features_<encoder>/``, STAMP, prov-gigapath), ``<folder>/h5_files/S.h5`` and
  ``<folder>/pt_files/S.pt`` (CLAM ``extract_features_fp.py`` output folder), ``<folder>/features_*/S.h5`` (a
  TRIDENT job folder with one encoder);
- a CSV with columns ``slide_id``, ``features_path`` (relative paths are relative to the CSV) and optionally
  ``level0_mpp`` (µm/px of that slide's level 0, for files that do not record it).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

EMBEDDINGS_FILE = "tile_embeddings.h5"


@dataclass(frozen=True)
class FeatureSource:
    """One slide's feature file and the per-slide unit given for it (CSV column ``level0_mpp``)."""

    slide_id: str
    path: Path
    level0_mpp: float | None = None


def _candidates(folder: Path, slide_id: str) -> list[Path]:
    return [folder / slide_id / EMBEDDINGS_FILE, folder / f"{slide_id}.h5", folder / "h5_files" / f"{slide_id}.h5",
            folder / "pt_files" / f"{slide_id}.pt", *sorted(folder.glob(f"features_*/{slide_id}.h5"))]


def is_table(source: str | Path) -> bool:
    return str(source).lower().endswith(".csv")


def read_feature_table(csv_path: str | Path, key: str) -> dict[str, FeatureSource]:
    """slide_id -> FeatureSource from a CSV (``slide_id``, ``features_path``[, ``level0_mpp``]).

    Raises:
        ConfigError (``key``): the CSV is missing, lacks a column, has a bad ``level0_mpp``, a duplicate
            slide_id or a path that does not exist (row named).
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows, header = list(reader), reader.fieldnames or []
    except FileNotFoundError:
        raise ConfigError(key, f"feature table not found: {csv_path}") from None
    missing = [c for c in ("slide_id", "features_path") if c not in header]
    if missing:
        raise ConfigError(key, f"{csv_path} needs columns slide_id, features_path; missing {', '.join(missing)}")
    out: dict[str, FeatureSource] = {}
    for j, row in enumerate(rows):
        where = f"{key}[row {j + 2}]"
        sid = (row.get("slide_id") or "").strip()
        p = Path((row.get("features_path") or "").strip()).expanduser()
        p = p if p.is_absolute() else csv_path.parent / p
        if not sid:
            raise ConfigError(where, f"{csv_path}: empty slide_id")
        if sid in out:
            raise ConfigError(where, f"{csv_path}: slide_id {sid!r} appears twice")
        if not p.is_file():
            raise ConfigError(f"{where}.features_path", f"file not found: {p}")
        mpp = (row.get("level0_mpp") or "").strip()
        try:
            value = float(mpp) if mpp else None
        except ValueError:
            raise ConfigError(f"{where}.level0_mpp", f"not a number: {mpp!r}") from None
        if value is not None and not value > 0:
            raise ConfigError(f"{where}.level0_mpp", f"must be > 0 (got {value})")
        out[sid] = FeatureSource(sid, p.resolve(), value)
    return out


class FeatureLocator:
    """Finds slides' feature files in a list of sources (folders or CSVs), first source first.

    Args:
        sources: folders or CSV paths; key: the config key named in errors (``data.embeddings``).
    """

    def __init__(self, sources: list[str | Path], key: str):
        self.folders: list[Path] = []
        self.tables: list[dict[str, FeatureSource]] = []
        self.order: list[tuple[str, int]] = []
        for i, s in enumerate(sources):
            where = f"{key}[{i}]" if len(sources) > 1 else key
            if is_table(s):
                self.order.append(("table", len(self.tables)))
                self.tables.append(read_feature_table(s, where))
            else:
                if not Path(s).is_dir():
                    raise ConfigError(where, f"feature folder not found: {s}")
                self.order.append(("folder", len(self.folders)))
                self.folders.append(Path(s))

    def find(self, slide_id: str) -> FeatureSource | None:
        for kind, i in self.order:
            if kind == "table":
                if slide_id in self.tables[i]:
                    return self.tables[i][slide_id]
            else:
                for p in _candidates(self.folders[i], slide_id):
                    if p.is_file():
                        return FeatureSource(slide_id, p)
        return None

    def all(self) -> dict[str, FeatureSource]:
        """Every slide the sources hold (folder layouts listed as above), first source wins."""
        out: dict[str, FeatureSource] = {}
        for kind, i in self.order:
            if kind == "table":
                found = self.tables[i]
            else:
                found = {}
                folder = self.folders[i]
                patterns = [f"*/{EMBEDDINGS_FILE}", "*.h5", "h5_files/*.h5", "pt_files/*.pt", "features_*/*.h5"]
                for pattern in patterns:
                    for p in sorted(folder.glob(pattern)):
                        sid = p.parent.name if p.name == EMBEDDINGS_FILE else p.stem
                        if sid not in found and not p.name.startswith("."):
                            found[sid] = FeatureSource(sid, p)
            for sid, src in found.items():
                out.setdefault(sid, src)
        return out
