"""Imported once by the forkserver that starts DataLoader workers for readers that are not fork-safe
(:mod:`gigapath_core.stages.worker_start`), so that each worker it forks starts with torch, gigapath and every
plugin module already imported instead of importing them again (seconds per worker).

Nothing here may decode a pixel or start a thread pool: the forkserver must stay a clean process to fork
from. A plugin that fails to import is skipped here exactly as it is in the parent (a warning).
"""

from __future__ import annotations

import warnings

import torch  # noqa: F401

try:  # what the workers use but plugin modules import lazily (torchvision alone: ~1-7 s per worker otherwise)
    import PIL.Image  # noqa: F401
    import torchvision.transforms  # noqa: F401
except Exception:  # pragma: no cover
    pass
try:
    from gigapath_core.plugins import get_plugin_manager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent already reported broken plugin packages
        get_plugin_manager()
except Exception:  # pragma: no cover - a worker then loads what it needs itself
    pass
