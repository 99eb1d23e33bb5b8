""""Did you mean" suggestions for misspelt config keys, plugin, preset and job names (difflib)."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``word`` (difflib ratio >= 0.6, case-insensitive), or None."""
    choices = [str(c) for c in choices]
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'inputs'?"`` for the closest choice, or ``""`` when none is close."""
    best = closest(word, choices)
    return f"; did you mean {best!r}?" if best is not None else ""
