"""Hook specifications: one hook per plugin kind, each returning the plugin classes a package provides.

A plugin package registers a module under the ``gigapath`` entry-point group and implements any of
these hooks with :data:`gigapath_core.hookimpl`::

    from gigapath_core import hookimpl

    @hookimpl
    def gigapath_tile_encoders():
        return [MyEncoder]          # subclasses of gigapath_core.kinds.TileEncoder
"""

from __future__ import annotations

import pluggy

PROJECT = "gigapath"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class GigapathSpecs:
    @hookspec
    def gigapath_slide_readers(self) -> list[type]:
        """SlideReader subclasses (open WSI files)."""

    @hookspec
    def gigapath_tilers(self) -> list[type]:
        """Tiler subclasses (tissue mask + tile grid)."""

    @hookspec
    def gigapath_tile_encoders(self) -> list[type]:
        """TileEncoder subclasses (tile pixels -> tile embedding)."""

    @hookspec
    def gigapath_slide_encoders(self) -> list[type]:
        """SlideEncoder subclasses (slide aggregators: LongNet, ABMIL-only, mean...)."""

    @hookspec
    def gigapath_ssl_objectives(self) -> list[type]:
        """SSLObjective subclasses (DINOv2, slide MAE, CLIP...)."""

    @hookspec
    def gigapath_task_heads(self) -> list[type]:
        """TaskHead subclasses (ABMIL, linear...)."""

    @hookspec
    def gigapath_text_encoders(self) -> list[type]:
        """TextEncoder subclasses (PubMedBERT and other BERT-family towers)."""

    @hookspec
    def gigapath_report_cleaners(self) -> list[type]:
        """ReportCleaner subclasses (pathology report de-identification before CLIP)."""


#: plugin kind -> hook name. The order is the order of the data flow.
KIND_HOOKS: dict[str, str] = {
    "slide_reader": "gigapath_slide_readers",
    "tiler": "gigapath_tilers",
    "tile_encoder": "gigapath_tile_encoders",
    "slide_encoder": "gigapath_slide_encoders",
    "task_head": "gigapath_task_heads",
    "ssl_objective": "gigapath_ssl_objectives",
    "text_encoder": "gigapath_text_encoders",
    "report_cleaner": "gigapath_report_cleaners",
}
KINDS = tuple(KIND_HOOKS)
