"""gigapath: a plugin framework reproducing the Prov-GigaPath whole-slide foundation model.

Public API::

    import gigapath_core as gp
    gp.list_plugins()                                   # every installed plugin, by kind
    enc = gp.build("tile_encoder", "dinov2-vits14", weights="random")
    gp.run("examples/quickstart.yaml", out="out/")      # a config-declared pipeline
"""

from __future__ import annotations

__version__ = "0.1.0"

from .hookspecs import KINDS, hookimpl  # noqa: E402

from .api import build, list_plugins, list_presets  # noqa: E402
from .jobs import run  # noqa: E402

__all__ = ["KINDS", "__version__", "build", "hookimpl", "list_plugins", "list_presets", "run"]
