"""Torch's intra-op CPU thread count for one block of code (:func:`torch_threads`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``torch.set_num_threads``), then restore the previous
    count, also when the block raises. Sets nothing when the count already is ``n`` and nothing changed it."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
