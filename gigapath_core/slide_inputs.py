"""Slide inputs of an ``embed`` config: ``inputs.slides`` (paths, globs), ``inputs.manifest`` (a CSV) and
``inputs.features`` expanded into :class:`~gigapath_core.config.SlideInput` rows, with every problem found
reported at once (one key-path line each, :class:`~gigapath_core.errors.ConfigErrors`)."""

from __future__ import annotations

import csv
import errno
import glob
import logging
import os
import stat
from pathlib import Path

from .config import InputsConfig, SlideInput
from .errors import ConfigError, ConfigErrors
from .non_slides import left_out_message, split_non_slides
from .slide_ids import fold_key, slide_id_problem

log = logging.getLogger("gigapath")
#: problems listed in one input error report; the rest are counted on one last line
MAX_PROBLEMS_SHOWN = 100


def _slide_id(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _regular_file(p: Path, key: str) -> None:
    """Raise ConfigError (at ``key``) unless ``p`` is, or links to, a regular file."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        hint = " (a broken symlink: its target does not exist)" if p.is_symlink() else ""
        raise ConfigError(key, f"slide not found: {p}{hint}") from None
    except OSError as err:
        what = "a symlink loop" if err.errno == errno.ELOOP else err.strerror or str(err)
        raise ConfigError(key, f"cannot read {p}: {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(key, f"{p} is a folder, not a slide file (for its slides use a pattern such as {p}/*.svs)")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(key, f"{p} is not a regular file (a pipe, socket or device cannot be a slide)")


def _inside(p: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        return Path(os.path.realpath(p)).is_relative_to(folder)
    except (OSError, ValueError):
        return False


def _glob(pattern: Path, key: str, out: Path | None) -> list[Path]:
    """Files matching ``pattern``: regular files, plus broken or looping symlinks (each then fails as its own
    slide, with the reason in the manifest); folders and special files are left out, and so is anything
    under the output folder ``out`` (our own outputs are not slides; a warning says how many), and files whose
    suffix is never a slide's (:mod:`gigapath_core.non_slides`: README.md, CSVs...; one warning lists them)."""
    found, under_out = [], []
    for m in sorted(glob.glob(str(pattern), recursive=True)):
        p = Path(m)
        if _inside(p, out):
            under_out.append(p)
        elif p.is_file() or (p.is_symlink() and not p.exists()):
            found.append(p)
    found, not_slides = split_non_slides(found)
    if not_slides:
        log.warning("%s: %s", key, left_out_message(not_slides))
    if under_out:
        log.warning("%s: left out %d file(s) under the output folder %s (e.g. %s)", key, len(under_out), out,
                    under_out[0])
    if not found and under_out:
        raise ConfigError(key, f"every file matching {pattern.name!r} (in {pattern.parent}) is inside the output "
                               f"folder {out}; gigapath's outputs are not slides: choose an output folder that does "
                               f"not hold the slides")
    if not found:
        what = f"no slide file matches {pattern.name!r}" if not_slides else f"no file matches {pattern.name!r}"
        raise ConfigError(key, f"{what} (looked in {pattern.parent})"
                          + (f"; {left_out_message(not_slides)}" if not_slides else ""))
    return found


def _slide_path(p: Path) -> str:
    try:
        return str(p.resolve())
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13): fails as its slide
        return os.path.abspath(p)


def _checked_id(slide_id: str, key: str, path: Path, named: bool) -> str:
    problem = slide_id_problem(slide_id)
    if problem:
        how = "" if named else f" (from the file name {path.name!r}; rename it, or give a slide_id in inputs.manifest)"
        raise ConfigError(key, f"{problem}{how}; see docs/promises.md (slide id rules)")
    return slide_id


def _read_manifest(mpath: Path) -> list[dict]:
    try:
        with open(mpath, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ConfigError("inputs.manifest", f"manifest not found: {mpath}") from None
    except IsADirectoryError:
        raise ConfigError("inputs.manifest", f"{mpath} is a folder, not a CSV file") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ConfigError("inputs.manifest", f"{mpath} is not a UTF-8 CSV file: {str(err).splitlines()[0]}") from None
    except OSError as err:
        raise ConfigError("inputs.manifest", f"cannot read {mpath}: {err.strerror or err}") from None
    if rows and "slide_path" not in rows[0]:
        has = ", ".join(map(str, rows[0]))
        raise ConfigError("inputs.manifest", f"{mpath} needs a 'slide_path' column (has {has})")
    return rows


def collect_slides(inputs: InputsConfig, base: Path, output: str | Path | None = None) -> list[SlideInput]:
    """Expand paths, globs and the CSV manifest into SlideInputs (input order, exact repeats removed).

    Every entry is checked before anything is raised, so a manifest with several bad rows is reported at once:
    one line per problem, ``inputs.manifest[row R].COLUMN: reason`` (R is the line number in the CSV file, the
    header being row 1), at most :data:`MAX_PROBLEMS_SHOWN` lines and then a count of the rest.

    Args:
        output: the run's output folder: files under it are never slides (left out of glob matches with a
            warning; an error when named explicitly), so a folder inside the input glob is safe to re-run.
    Raises ConfigError (one problem) or ConfigErrors (several), key paths ``inputs.slides[i]`` /
    ``inputs.manifest[row R].slide_path|slide_id|slide_mpp``, for a path or pattern that matches no file, a
    path that is a folder, a special file or a symlink loop, a manifest without ``slide_path``, a slide_mpp
    that is not a number, a slide_id that is not a safe folder name (:mod:`gigapath_core.slide_ids`), two
    slides with the same slide_id (also when they differ only in letter case or Unicode normal form), or one
    slide file (same resolved path or same inode) listed under two slide ids, or twice with different
    slide_mpp / mask (it would be embedded twice, and could fall on both sides of a train/test split).
    """
    if inputs.features:
        return _feature_inputs(inputs, base)
    out = Path(os.path.realpath(output)) if output is not None else None
    problems: list[ConfigError] = []
    listed: list[tuple[str, SlideInput]] = []  # (where it is listed, the slide)
    for i, pattern in enumerate(inputs.slides):
        key = f"inputs.slides[{i}]"
        try:
            listed += [(key, s) for s in _pattern_slides(pattern, key, base, out, inputs.mpp)]
        except ConfigError as err:
            problems.append(err)
    mask_dir = None
    if inputs.masks:
        mask_dir = Path(inputs.masks).expanduser()
        mask_dir = mask_dir if mask_dir.is_absolute() else base / mask_dir
        if not mask_dir.is_dir():
            problems.append(ConfigError("inputs.masks", f"not a folder: {mask_dir} (expected a folder of "
                                                        f"<slide_id>.geojson)"))
    if inputs.manifest:
        mpath = Path(inputs.manifest).expanduser()
        mpath = mpath if mpath.is_absolute() else base / mpath
        try:
            rows = _read_manifest(mpath)
        except ConfigError as err:
            problems.append(err)
            rows = []
        for j, row in enumerate(rows):
            key = f"inputs.manifest[row {j + 2}]"
            slide = _manifest_slide(row, key, mpath, out, inputs.mpp, problems)
            if slide is not None:
                listed.append((key, slide))
    unique = _unique(listed, problems)
    if problems:
        raise ConfigErrors.of(_capped(problems))
    if not unique:
        raise ConfigError("inputs", "no slides given (inputs.slides or inputs.manifest)")
    if mask_dir is not None:  # a slide without its file fails alone (MaskError "file not found"), not the run
        for s in unique:
            if s.mask is None:
                s.mask = str((mask_dir / f"{s.slide_id}.geojson").resolve())
    return unique


def _pattern_slides(pattern: str, key: str, base: Path, out: Path | None, mpp: float | None) -> list[SlideInput]:
    """The slides of one ``inputs.slides`` entry (a path or a glob pattern). Raises ConfigError at ``key``."""
    p = Path(pattern).expanduser()
    p = p if p.is_absolute() else base / p
    if glob.has_magic(str(p)):
        matches = _glob(p, key, out)
    else:
        _regular_file(p, key)
        if _inside(p, out):
            raise ConfigError(key, f"{p} is inside the output folder {out}; gigapath's outputs are not slides")
        matches = [p]
    return [SlideInput(slide_id=_checked_id(_slide_id(m), key, m, False), path=_slide_path(m), mpp=mpp)
            for m in matches]


def _manifest_slide(row: dict, key: str, mpath: Path, out: Path | None, mpp: float | None,
                    problems: list[ConfigError]) -> SlideInput | None:
    """The slide of one manifest row, or None with each of its bad cells appended to ``problems``
    (``KEY.slide_path`` / ``KEY.slide_mpp`` / ``KEY.slide_id``)."""
    found: list[ConfigError] = []
    raw_path = (row.get("slide_path") or "").strip()
    sp = None
    if not raw_path:
        found.append(ConfigError(f"{key}.slide_path", "empty"))
    else:
        sp = Path(row["slide_path"]).expanduser()
        sp = sp if sp.is_absolute() else mpath.parent / sp
        try:
            _regular_file(sp, f"{key}.slide_path")
            if _inside(sp, out):
                raise ConfigError(f"{key}.slide_path", f"{sp} is inside the output folder {out}; gigapath's outputs "
                                                       f"are not slides")
        except ConfigError as err:
            found.append(err)
    cell = row.get("slide_mpp") or None
    try:
        mpp_value = float(cell) if cell else mpp
    except ValueError:
        found.append(ConfigError(f"{key}.slide_mpp", f"not a number: {cell!r}"))
    named = row.get("slide_id") is not None and row.get("slide_id") != ""
    sid = None
    if named or sp is not None:
        try:
            sid = _checked_id(row["slide_id"] if named else _slide_id(sp),
                              f"{key}.slide_id" if named else f"{key}.slide_path", sp, named)
        except ConfigError as err:
            found.append(err)
    if found:
        problems += found
        return None
    mask = (row.get("mask") or "").strip() or None
    if mask:
        mp = Path(mask).expanduser()
        mask = str((mp if mp.is_absolute() else mpath.parent / mp).resolve())
    return SlideInput(slide_id=sid, path=_slide_path(sp), mpp=mpp_value, mask=mask)


def _file_key(path: str) -> tuple:
    """Identity of a slide file: (device, inode) when it can be stat'ed (a hard link or a second path to
    the same file is the same slide), else its resolved path."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", path)
    return ("inode", st.st_dev, st.st_ino)


def _unique(listed: list[tuple[str, SlideInput]], problems: list[ConfigError]) -> list[SlideInput]:
    """The slides with exact repeats (same id, same file, same settings) dropped; a conflict (one id for two
    files, ids one folder apart in letter case, one file under two ids or with two settings) appended to
    ``problems`` at the later entry's key, naming the earlier one."""
    by_id: dict[str, tuple[str, SlideInput]] = {}
    by_file: dict[tuple, tuple[str, SlideInput]] = {}
    unique = []
    for key, s in listed:
        fkey = _file_key(s.path)
        same_id, same_file = by_id.get(fold_key(s.slide_id)), by_file.get(fkey)
        if same_file is not None:
            where, first = same_file
            if first.slide_id != s.slide_id:
                problems.append(ConfigError(key, f"{s.path} is already listed as slide {first.slide_id!r} ({where}); "
                                                 f"one slide file under two slide_ids ({first.slide_id!r} and "
                                                 f"{s.slide_id!r}) would be embedded twice: list it once"))
            elif (first.mpp, first.mask) != (s.mpp, s.mask):
                problems.append(ConfigError(key, f"slide {s.slide_id!r} ({s.path}) is listed twice with different "
                                                 f"settings: slide_mpp {first.mpp} mask {first.mask} ({where}) vs "
                                                 f"slide_mpp {s.mpp} mask {s.mask}: list it once"))
            continue  # an exact repeat: dropped
        if same_id is not None:
            where, first = same_id
            if first.slide_id == s.slide_id:
                problems.append(ConfigError(key, f"two slides share slide_id {s.slide_id!r}: {first.path} ({where}) "
                                                 f"and {s.path}"))
            else:
                problems.append(ConfigError(key, f"slide_ids {first.slide_id!r} ({first.path}, {where}) and "
                                                 f"{s.slide_id!r} ({s.path}) differ only in letter case or Unicode "
                                                 f"form: one folder on macOS/Windows file systems"))
            continue
        by_id[fold_key(s.slide_id)] = by_file[fkey] = (key, s)
        unique.append(s)
    return unique


def _capped(problems: list[ConfigError]) -> list[ConfigError]:
    """The first :data:`MAX_PROBLEMS_SHOWN` problems, and one line counting the rest."""
    if len(problems) <= MAX_PROBLEMS_SHOWN:
        return problems
    rest = len(problems) - MAX_PROBLEMS_SHOWN
    return problems[:MAX_PROBLEMS_SHOWN] + [ConfigError("inputs", f"{rest:,} more problems not shown "
                                                                  f"({len(problems):,} in all)")]


def _feature_inputs(inputs: InputsConfig, base: Path) -> list[SlideInput]:
    """``inputs.features`` (a folder of feature files or a CSV of paths) -> one SlideInput per file; ``path`` is
    the feature file, ``mpp`` its level-0 µm/px (CSV column ``level0_mpp``, else ``inputs.mpp``)."""
    from .interop import FeatureLocator

    src = Path(inputs.features).expanduser()
    src = src if src.is_absolute() else base / src
    if not src.exists():
        raise ConfigError("inputs.features", f"not found: {src}")
    found = FeatureLocator([str(src)], "inputs.features").all()
    if not found:
        raise ConfigError("inputs.features", f"no tile-feature file in {src} (looked for <slide>/tile_embeddings.h5, "
                          "<slide>.h5, h5_files/<slide>.h5, pt_files/<slide>.pt, features_*/<slide>.h5)")
    return [SlideInput(slide_id=_checked_id(sid, "inputs.features", Path(f.path), True), path=str(f.path),
                       mpp=f.level0_mpp or inputs.mpp) for sid, f in found.items()]
