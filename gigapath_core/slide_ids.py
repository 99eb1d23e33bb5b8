"""Slide ids are folder names under the output folder: the rules that keep every slide inside ``OUT``.

A slide id (from a file name, or the ``slide_id`` column of an input manifest) names ``OUT/<slide_id>/``.
It must be one safe path component:

* not empty, at most :data:`MAX_ID_BYTES` bytes in UTF-8 (file systems allow 255 per name);
* no ``/`` or ``\\`` (path separators on POSIX / Windows), no NUL or other control character (U+0000-U+001F,
  U+007F), which no file system or CSV reader handles the same way;
* not ``.`` or ``..``, and no leading ``.``: a hidden folder, and gigapath's own names in ``OUT`` (temporary
  files ``.gigapath-tmp-*``, locks ``.gigapath.lock``) start with a dot;
* no leading or trailing whitespace (invisible in the manifest, trimmed by spreadsheet tools);
* not a name gigapath writes in ``OUT`` itself (``manifest.csv``, ``manifest-shard-K-of-N.csv``).

Everything else is allowed, including spaces inside, a leading ``-`` (gigapath never passes ids to a shell)
and any non-ASCII letter (``tëst_スライド``). Two ids that differ only in letter case or Unicode normal form
(NFC/NFD) would share one folder on macOS and Windows file systems, so they are refused as duplicates.

Defence in depth: :func:`slide_dir` also checks that the folder resolves inside ``OUT`` (a symlink planted at
``OUT/<slide_id>`` pointing elsewhere is refused).
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from .errors import SlideError

MAX_ID_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_RESERVED = re.compile(r"^manifest(-shard-\d+-of-\d+)?\.csv$", re.IGNORECASE)


def slide_id_problem(slide_id: str) -> str | None:
    """Why ``slide_id`` cannot name a folder under ``OUT`` (one line), or None if it can."""
    if not isinstance(slide_id, str) or slide_id == "":
        return "empty slide_id"
    if "/" in slide_id or "\\" in slide_id:
        return f"slide_id {slide_id!r} contains a path separator ('/' or '\\'); it must be a single folder name"
    if _CONTROL.search(slide_id):
        return f"slide_id {slide_id!r} contains a control character (NUL, newline, tab...)"
    if slide_id in (".", ".."):
        return f"slide_id {slide_id!r} is not a folder name"
    if slide_id.startswith("."):
        return f"slide_id {slide_id!r} starts with '.' (hidden; gigapath's own files in OUT start with '.')"
    if slide_id != slide_id.strip():
        return f"slide_id {slide_id!r} has leading or trailing whitespace"
    if len(slide_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"slide_id {slide_id[:40]!r}... is longer than {MAX_ID_BYTES} bytes (UTF-8)"
    if _RESERVED.match(slide_id):
        return f"slide_id {slide_id!r} is a file name gigapath writes in the output folder"
    return None


def fold_key(slide_id: str) -> str:
    """The key under which two ids would share a folder on a case-insensitive, normalising file system."""
    return unicodedata.normalize("NFC", slide_id).casefold()


def slide_dir(output: str | Path, slide_id: str) -> Path:
    """``OUT/<slide_id>``, checked.

    Raises:
        SlideError: the id is not a safe folder name (see the module docstring), or ``OUT/<slide_id>``
            resolves outside ``OUT`` (a symlink planted there).
    """
    out = Path(output)
    problem = slide_id_problem(slide_id)
    if problem:
        raise SlideError(out / "<slide_id>", problem)
    folder = out / slide_id
    resolved_out = out.resolve()
    try:
        resolved = folder.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise SlideError(folder, f"cannot resolve the slide folder: {err}") from None
    if resolved.parent != resolved_out:
        raise SlideError(folder, f"the slide folder resolves to {resolved}, outside the output folder {resolved_out} "
                                 f"(a symlink?); refused")
    return folder
