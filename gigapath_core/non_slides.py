"""File suffixes that are never slides: a glob in ``inputs.slides`` (``data/*``) leaves such files out, with one
warning per pattern, instead of failing them one by one as slides. A path named explicitly, and every manifest
row, is never left out (the user asked for that file).

Images (``.png``, ``.jpg``) are not in the list: pyvips opens them, and with ``inputs.mpp`` they tile.
"""

from __future__ import annotations

from pathlib import Path

NON_SLIDE_SUFFIXES = frozenset({
    ".md", ".rst", ".txt", ".csv", ".tsv", ".json", ".yaml", ".yml", ".geojson", ".xml", ".ini", ".html", ".pdf",
    ".log", ".py", ".ipynb", ".h5", ".hdf5", ".npy", ".npz", ".pt", ".pth", ".safetensors",
})


def split_non_slides(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """``(kept, left_out)``: ``left_out`` are the paths whose suffix (any case) is in NON_SLIDE_SUFFIXES."""
    kept = [p for p in paths if p.suffix.lower() not in NON_SLIDE_SUFFIXES]
    return kept, [p for p in paths if p.suffix.lower() in NON_SLIDE_SUFFIXES]


def left_out_message(left_out: list[Path], shown: int = 5) -> str:
    """``"left out 3 file(s) that are not slides (.csv, .md): README.md, a.csv, b.csv"``."""
    names = ", ".join(p.name for p in left_out[:shown]) + (", ..." if len(left_out) > shown else "")
    suffixes = ", ".join(sorted({p.suffix.lower() for p in left_out}))
    return f"left out {len(left_out)} file(s) that are not slides ({suffixes}): {names}"
