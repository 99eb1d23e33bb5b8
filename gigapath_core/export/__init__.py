"""``gigapath export``: write a finished run's tile features in another tool's folder layout and file format.

Formats (one module each; each module's docstring cites the other tool's reading code):

=================  ==============================================================================================
``trident``        ``DEST/20x_256px_0px_overlap/features_<encoder>/<slide>.h5`` + ``patches/<slide>_patches.h5``
``clam``           ``DEST/h5_files/<slide>.h5``, ``DEST/pt_files/<slide>.pt``, ``DEST/patches/<slide>.h5``
``stamp``          ``DEST/<slide>.h5`` (``feats``, ``coords`` in µm) + ``DEST/slide_table.csv``
``prov-gigapath``  ``DEST/<slide>.h5`` (``features``, ``coords`` = grid px at 0.5 µm/px) for the official finetune
``anndata``        ``DEST/<slide>.h5ad`` or ``DEST/cohort.h5ad`` (``cohort=True``)
=================  ==============================================================================================

Only slides whose ``status.json`` says ``ok`` are exported; the others, and slides an exporter refuses (e.g. no
level-0 coordinates), are listed in ``DEST/export.json`` with their reason. Every file is written atomically.
Default ``DEST`` is ``OUT/export/<format>/``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, SlideError
from ..store import write_json
from . import clam, h5ad, provgigapath, stamp, trident
from ._source import SlideFeatures, list_slides, other_job_output, read_slide

log = logging.getLogger("gigapath")

#: format name -> writer of one slide ``(SlideFeatures, dest, encoder=) -> [paths]``
FORMATS: dict[str, Callable[..., list[Path]]] = {
    "trident": trident.export_slide,
    "clam": clam.export_slide,
    "stamp": stamp.export_slide,
    "prov-gigapath": provgigapath.export_slide,
    "anndata": h5ad.export_slide,
}

__all__ = ["FORMATS", "ExportResult", "export_run", "read_slide", "SlideFeatures"]


@dataclass
class ExportResult:
    """What :func:`export_run` did.

    Attributes:
        dest: the folder written.
        exported: slide ids written.
        not_exported: ``{"slide_id", "status", "reason"}`` per slide left out (not ok in the run, or refused).
        files: every file written.
    """

    fmt: str
    dest: Path
    exported: list[str] = field(default_factory=list)
    not_exported: list[dict[str, str]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the console."""
        line = f"exported {len(self.exported)} slide(s) as {self.fmt} -> {self.dest}"
        if self.not_exported:
            line += f"; not exported: {len(self.not_exported)} (" + ", ".join(
                f"{r['slide_id']}: {r['status']}" for r in self.not_exported) + f"; see {self.dest / 'export.json'})"
        return line


def export_run(out: str | Path, fmt: str, dest: str | Path | None = None, *, cohort: bool = False,
               encoder: str | None = None) -> ExportResult:
    """Export the finished run in ``out`` to ``fmt``.

    Args:
        out: run folder (``manifest.csv``, ``<slide_id>/status.json``, ``<slide_id>/tile_embeddings.h5``).
        fmt: one of :data:`FORMATS`.
        dest: output folder; default ``out/export/<fmt>``.
        cohort: anndata only: one ``cohort.h5ad`` for all slides instead of one file per slide.
        encoder: tile-encoder name for TRIDENT's ``features_<encoder>`` folder and STAMP's ``extractor``
            (default :func:`._write.encoder_name`: ``gigapath`` for the Prov-GigaPath tile encoder with its
            released weights, else the run's recorded tile-encoder name: the preset name if the run used one,
            ``dinov2-vits14``, else the plugin name, ``dinov2_vit``).
    Raises:
        ConfigError: unknown format, ``cohort`` with another format, ``encoder`` not a plain name, ``out`` missing,
            not a run folder or another job's output (a finetune folder; nothing is written), or anndata missing.
    """
    if fmt not in FORMATS:
        raise ConfigError("export.format", f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if encoder is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", encoder):
        raise ConfigError("export.encoder", f"{encoder!r} is not a plain name (letters, digits, '.', '_', '-'); it "
                                            "becomes a folder name (features_<encoder>) and STAMP's extractor")
    if cohort and fmt != "anndata":
        raise ConfigError("export.cohort", f"--cohort applies to --format anndata only, not {fmt!r}")
    out = Path(out)
    if not out.is_dir():
        raise ConfigError("export.out", f"{out}: no such run folder")
    job = other_job_output(out)
    if job is not None:
        raise ConfigError("export.out", f"{out} is not an embed run folder (no manifest.csv; it looks like a {job} "
                                        "output); give the embed run's output folder")
    ok, others = list_slides(out)
    if not ok and not others:
        raise ConfigError("export.out", f"{out}: not a run folder (no manifest.csv and no <slide_id>/status.json)")
    if fmt == "anndata":
        h5ad.import_anndata()
    res = ExportResult(fmt, Path(dest) if dest is not None else out / "export" / fmt)
    if res.dest.exists() and not res.dest.is_dir():
        raise ConfigError("export.dest", f"{res.dest} exists and is not a folder")
    res.not_exported.extend(others)
    parts: list[tuple[SlideFeatures, Any]] = []
    for sid in ok:
        try:
            sf = read_slide(out / sid)
            if cohort:
                parts.append((sf, h5ad.slide_part(sf)))
            else:
                res.files += FORMATS[fmt](sf, res.dest, encoder=encoder)
        except SlideError as err:
            log.warning("export: %s not exported: %s", sid, err)
            res.not_exported.append({"slide_id": sid, "status": "refused", "reason": str(err)})
            continue
        res.exported.append(sid)
    if cohort:
        res.files += h5ad.export_cohort(parts, res.dest)
    if fmt == "stamp" and res.exported:
        res.files += stamp.finish(res.exported, res.dest)
    res.dest.mkdir(parents=True, exist_ok=True)
    write_json(res.dest / "export.json", {"format": fmt, "source": str(out.resolve()), "cohort": cohort,
                                          "exported": res.exported, "not_exported": res.not_exported,
                                          "files": [str(p.relative_to(res.dest)) for p in res.files]})
    return res
