"""``--shard k/N``: a deterministic slice of the slides, so a plain Slurm job array needs no engine.

Shard ``k`` of ``N`` (``0 <= k < N``, as ``$SLURM_ARRAY_TASK_ID`` counts with ``--array=0-(N-1)``) takes the
slides at positions ``k, k+N, k+2N, ...`` of the input order (paths and globs in config order, globs sorted),
so shards differ in size by at most one slide and together cover every slide exactly once.
"""

from __future__ import annotations

import re
from typing import Sequence, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(shard: str) -> tuple[int, int]:
    """``"k/N"`` -> ``(k, N)``. Raises ConfigError (key ``--shard``) unless ``0 <= k < N``."""
    m = _SHARD.match(str(shard))
    if not m:
        raise ConfigError("--shard", f"expected k/N with 0 <= k < N (e.g. 0/10), got {shard!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= k < n:
        raise ConfigError("--shard", f"expected k/N with 0 <= k < N (shards are numbered from 0), got {shard!r}")
    return k, n


def shard_slides(slides: Sequence[T], shard: str | None) -> list[T]:
    """The slides of shard ``k/N`` (every slide when ``shard`` is None or empty)."""
    if not shard:
        return list(slides)
    k, n = parse_shard(shard)
    return list(slides[k::n])
