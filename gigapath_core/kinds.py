"""Abstract base classes of every plugin kind, with their contracts (shapes, dtypes, units).

Every plugin class sets ``name`` (unique within its kind) and a pydantic ``Params`` model
(``extra="forbid"``) describing its constructor keyword arguments; :func:`gigapath_core.build` validates
parameters against ``Params`` and calls ``cls.from_params(params)``.

Units (see :mod:`gigapath_core.units`): *level-0 px* are pixels of the slide's full-resolution level;
*grid px* are pixels at the target resolution (0.5 µm/px by default), where tile ``(col, row)`` sits at
``(col * tile_size, row * tile_size)``. The slide encoder takes grid px (Xu et al. 2024, Methods: Preprocessing WSIs).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class PluginParams(BaseModel):
    """Base of every plugin's ``Params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Plugin:
    """Mixin giving a plugin class its identity and parameter model."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type[PluginParams]] = PluginParams

    @classmethod
    def from_params(cls, params: PluginParams) -> "Plugin":
        """Construct from validated params (default: ``cls(**fields)``)."""
        return cls(**{k: getattr(params, k) for k in type(params).model_fields})

    @classmethod
    def describe(cls) -> str:
        """The docstring's first sentence on one line (its first paragraph up to a '.', '!' or '?' outside
        brackets that ends the text or is followed by a space and a capital), without RST ``literal`` or
        :role:`x` markup: the description ``gigapath plugins`` shows."""
        import inspect
        import re

        para = " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n", 1)[0].split())
        para = re.sub(r":\w+:`~?([^`]*)`", r"\1", para).replace("`", "")
        depth = 0
        for i, ch in enumerate(para):
            depth += (ch in "([{") - (ch in ")]}")
            ends = i + 1 == len(para) or (para[i + 1] == " " and para[i + 2:i + 3].isupper())
            if ch in ".!?" and depth <= 0 and ends:
                return para[: i + 1]
        return para


def thumbnail_size(level0: tuple[int, int], max_size: int) -> tuple[int, int]:
    """(w, h) of a thumbnail with long side ``max_size`` — never larger than the slide (no upsampling)."""
    w0, h0 = level0
    scale = min(1.0, max_size / max(w0, h0))
    return max(1, round(w0 * scale)), max(1, round(h0 * scale))


def thumbnail_level(level_dimensions: list[tuple[int, int]], size: tuple[int, int]) -> int:
    """Coarsest level that is at least ``size`` (w, h) on both axes, so a thumbnail is a downsample of it.

    Every reader builds its thumbnail from this level; its pixel count is what a thumbnail decodes (the
    tiler's ``max_decode_mpx`` budget is checked against it before any pixel is read).
    """
    best = 0
    for i, (w, h) in enumerate(level_dimensions):
        if w >= size[0] and h >= size[1] and w * h <= level_dimensions[best][0] * level_dimensions[best][1]:
            best = i
    return best


# --------------------------------------------------------------------------------------- slide I/O
class WSI(abc.ABC):
    """An open whole-slide image. Returned by :meth:`SlideReader.open`; use as a context manager.

    Attributes:
        path: the file.
        reader: name of the SlideReader plugin that opened it (recorded in the outputs).
    """

    path: str
    reader: str

    @property
    @abc.abstractmethod
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) in pixels of each pyramid level, level 0 first."""

    @property
    @abc.abstractmethod
    def level_downsamples(self) -> list[float]:
        """Downsample factor of each level relative to level 0 (level 0 is 1.0)."""

    @property
    @abc.abstractmethod
    def mpp(self) -> tuple[float, float] | None:
        """(mpp_x, mpp_y) of level 0 in µm/px from the file's metadata, or None if absent."""

    @abc.abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read pixels.

        Args:
            location: (x, y) top-left corner in level-0 px.
            level: pyramid level to read from.
            size: (width, height) in pixels of ``level``.
        Returns:
            (height, width, 3) uint8 RGB; areas outside the slide are white.
        Raises:
            SlideReadError: the pixels cannot be decoded.
        """

    def thumbnail(self, max_size: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB image of the whole slide, ``thumbnail_size(level 0, max_size)`` px.

        Default: read the level chosen by :func:`thumbnail_level` (the coarsest at least that size, so the
        decode cost is that level's pixel count, which the tiler checks against its budget first) and
        downsample it. Readers override this with a bounded-memory version.
        """
        from PIL import Image

        size = thumbnail_size(self.level_dimensions[0], max_size)
        level = thumbnail_level(self.level_dimensions, size)
        w, h = self.level_dimensions[level]
        img = self.read_region((0, 0), level, (w, h))
        if size != (w, h):
            img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
        return img

    def thumbnail_cost(self, size: tuple[int, int]) -> tuple[int, int]:
        """(level, pixels decoded) to make a thumbnail of ``size`` (w, h): by default the whole of
        :func:`thumbnail_level`. A reader that decodes less (JPEG shrink-on-load) overrides it. The tiler
        compares the pixels with its ``max_decode_mpx`` budget before calling :meth:`thumbnail`."""
        level = thumbnail_level(self.level_dimensions, size)
        w, h = self.level_dimensions[level]
        return level, int(w) * int(h)

    @property
    def properties(self) -> dict[str, str]:
        """Raw metadata (vendor properties), for the record."""
        return {}

    def close(self) -> None:
        """Release file handles."""

    def __enter__(self) -> "WSI":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SlideReader(Plugin, abc.ABC):
    """Opens slide files of the formats it supports. Readers are tried in the configured order."""

    kind: ClassVar[str] = "slide_reader"
    #: False when the reader's library keeps process-wide runtime state (thread pools, caches) that a child
    #: made by ``fork`` inherits but cannot use: libvips' thread set makes a forked worker block forever in its
    #: first pixel read (issue #11). DataLoader workers reading with such a reader are started with
    #: ``forkserver`` instead (:mod:`gigapath_core.stages.worker_start`).
    fork_safe: ClassVar[bool] = True

    def unavailable_reason(self) -> str | None:
        """None if this reader can open files here, else why not (e.g. its optional library is missing), with
        how to install it. ``gigapath doctor`` shows it."""
        return None

    @abc.abstractmethod
    def open(self, path: str) -> WSI:
        """Open ``path``.

        Raises:
            SlideOpenError: this reader cannot open the file (the message says why).
        """


# --------------------------------------------------------------------------------------- tiling
@dataclass
class TileGrid:
    """The kept tiles of one slide, in row-major order (by grid row, then column).

    Attributes:
        coords: (N, 2) int64, level-0 px (x, y) of each tile's top-left corner.
        grid_coords: (N, 2) int64, grid px (x, y) at ``target_mpp``; multiples of ``tile_size``.
        occupancy: (N,) float32 in [0, 1], tissue fraction of each tile measured on the tissue mask.
        tile_size: tile side in grid px (256).
        target_mpp: µm/px of the tiles handed to the tile encoder (0.5).
        source_mpp: µm/px of level 0 (x, y) used to compute the grid.
        level: pyramid level the tiles are read from (the coarsest at or finer than target_mpp).
        read_size: side in ``level`` px of the region read for one tile before resampling.
        tissue_mask: (h, w) bool mask on the thumbnail; ``mask_downsample`` level-0 px per mask px.
        thumbnail: (h, w, 3) uint8 RGB thumbnail the mask was computed on.
        info: free-form facts (threshold, method...) recorded in tiles.h5 attrs.
    """

    coords: np.ndarray
    grid_coords: np.ndarray
    occupancy: np.ndarray
    tile_size: int
    target_mpp: float
    source_mpp: tuple[float, float]
    level: int
    read_size: int
    tissue_mask: np.ndarray
    mask_downsample: float
    thumbnail: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


class Tiler(Plugin, abc.ABC):
    """Finds tissue and lays the tile grid (Xu et al. 2024, Methods: Preprocessing WSIs)."""

    kind: ClassVar[str] = "tiler"

    @abc.abstractmethod
    def tile(self, wsi: WSI, mpp: tuple[float, float] | None = None, annotations: Any = None) -> TileGrid:
        """Compute the tile grid of ``wsi``.

        Args:
            mpp: override of the slide's level-0 (mpp_x, mpp_y); None uses the metadata.
            annotations: a :class:`gigapath_core.masks.AnnotationMask` (QuPath GeoJSON region, level-0 px) or
                None. With ``mode == "intersect"`` only tissue inside ``annotations.region`` counts towards a
                tile's occupancy; with ``"replace"`` the region replaces the tissue mask (rule:
                :mod:`gigapath_core.masks`). A tiler that cannot honour it must raise, never ignore it.
        Raises:
            MissingMppError, ImplausibleMppError: no usable mpp.
            PixelBudgetError: the mask thumbnail would decode more pixels than the tiler's budget.
        """

    def read_tile(self, wsi: WSI, location: tuple[int, int], level: int, read_size: int, tile_size: int) -> np.ndarray:
        """Pixels of one tile: (tile_size, tile_size, 3) uint8 RGB at the grid's target mpp.

        Args:
            location: (x, y) level-0 px of the tile's top-left corner (``TileGrid.coords[i]``).
            level, read_size: ``TileGrid.level`` and ``TileGrid.read_size``.
        Reads ``read_size`` px at ``level`` and resamples with an antialiasing (Lanczos) filter.
        Raises SlideReadError if the pixels cannot be decoded.
        """
        from PIL import Image

        img = wsi.read_region((int(location[0]), int(location[1])), level, (read_size, read_size))
        if read_size != tile_size:
            img = np.asarray(Image.fromarray(img).resize((tile_size, tile_size), Image.Resampling.LANCZOS))
        return img


# --------------------------------------------------------------------------------------- models
class TileEncoder(Plugin, nn.Module, abc.ABC):
    """Tile pixels -> tile embedding.

    Attributes:
        embed_dim: D, the output width.
        weights_source: where the weights came from (``"random"`` if not pretrained).
    """

    kind: ClassVar[str] = "tile_encoder"
    embed_dim: int
    weights_source: str = "random"

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def transform(self, tile: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB tile -> (3, h, w) float32 model input (resize, crop, normalise)."""

    @abc.abstractmethod
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) float32 -> (B, D) float32 tile embeddings."""

    def load_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load a state dict strictly; override to remap a published checkpoint layout.

        Raises:
            WeightsError: missing or unexpected keys (listed by name) or shape mismatches.
        """
        from .weights import load_state_dict_strict

        load_state_dict_strict(self, state_dict, source)
        self.weights_source = source


class SlideEncoder(Plugin, nn.Module, abc.ABC):
    """Tile embeddings + positions -> slide embedding (slide aggregator).

    Attributes:
        in_dim: Din, width of the tile embeddings it takes.
        embed_dim: D, width of the slide embedding.
        input_width_param: the name of the ``Params`` field (constructor argument) that sets ``in_dim``; the
            embed, finetune and pretraining jobs fill it from the tile encoder or the features
            (:func:`gigapath_core.widths.fill_input_width`). ``None``: the encoder's input width is fixed.
    """

    kind: ClassVar[str] = "slide_encoder"
    input_width_param: ClassVar[str | None] = "in_dim"
    in_dim: int
    embed_dim: int
    weights_source: str = "random"

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def forward(
        self,
        tile_embeds: torch.Tensor,
        coords: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        return_tile_tokens: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Encode slides.

        Args:
            tile_embeds: (B, N, Din) float tile embeddings, in tile (row-major) order.
            coords: (B, N, 2) grid px (x, y) at 0.5 µm/px — see :mod:`gigapath_core.units`.
            padding_mask: (B, N) bool, True where a position is padding (batched slides of different N).
            return_tile_tokens: also return contextual tile embeddings (B, N, D).
        Returns:
            (B, D) slide embeddings, or ((B, D), (B, N, D)) with ``return_tile_tokens``.
        """

    load_weights = TileEncoder.load_weights


class TaskHead(Plugin, nn.Module, abc.ABC):
    """Slide-level prediction from tile tokens and/or a slide embedding (Xu et al. 2024, Methods: mutation prediction,
    cancer subtyping)."""

    kind: ClassVar[str] = "task_head"

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def forward(
        self,
        tile_tokens: torch.Tensor | None,
        padding_mask: torch.Tensor | None = None,
        slide_embed: torch.Tensor | None = None,
        tile_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tile_tokens (B, N, D), slide_embed (B, D), tile_features (B, N, Din) -> logits (B, C) float32."""

    def training_loss(self, task_loss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The scalar to minimise, given the task's loss on this head's last forward and that batch's target.

        The hook for heads with auxiliary objectives (CLAM's instance clustering adds its term here); the
        default is the task loss itself. Called by the finetune runner in training only.
        """
        return task_loss


class SSLObjective(Plugin, nn.Module, abc.ABC):
    """A self-supervised or contrastive training objective: model parts + loss (Xu et al. 2024, Methods: tile encoder;
    slide encoder (LongNet); slide-level vision-language alignment).

    Training protocol (see :mod:`gigapath_core.pretrain`): the job reads raw samples of the kind named by
    ``data`` (``"tiles"``: (H, W, 3) uint8 RGB tiles; ``"slides"``: dicts with ``features`` (N, D) float32 and
    ``coords`` (N, 2) grid px; ``"pairs"``: slides plus ``text``), calls ``view(sample, rng)`` on each sample
    (augmentations and masks; all randomness from ``rng`` so a resumed run sees the same views),
    ``collate(views)`` per micro-batch, then ``forward(batch)``; ``after_step(step, total_steps)`` runs after
    every optimiser step (e.g. the EMA teacher update).
    """

    kind: ClassVar[str] = "ssl_objective"
    data: ClassVar[str] = "tiles"

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Compute the loss on one batch. Returns a dict with at least ``"loss"`` (scalar tensor)."""

    def view(self, sample: Any, rng: np.random.Generator) -> Any:
        """One raw sample -> one training view (default: unchanged)."""
        return sample

    def collate(self, views: list[Any]) -> dict[str, Any]:
        """Views of one micro-batch -> the ``batch`` given to :meth:`forward` (default: ``{"items": views}``)."""
        return {"items": views}

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after optimiser step ``step`` (1-based) of ``total_steps``."""


class TextEncoder(Plugin, nn.Module, abc.ABC):
    """Text tower for slide-report alignment (Xu et al. 2024, Methods: slide-level vision-language alignment).
    ``embed_dim`` is its output width."""

    kind: ClassVar[str] = "text_encoder"
    embed_dim: int

    def __init__(self) -> None:
        nn.Module.__init__(self)

    @abc.abstractmethod
    def forward(self, texts: list[str]) -> torch.Tensor:
        """List of B strings -> (B, D) float32 text embeddings."""


class ReportCleaner(Plugin, abc.ABC):
    """Removes identifying and non-diagnostic text from a pathology report before CLIP (Xu et al. 2024, Methods:
    slide-level vision-language alignment)."""

    kind: ClassVar[str] = "report_cleaner"

    @abc.abstractmethod
    def clean(self, report: str) -> str:
        """Raw report -> cleaned diagnostic text."""

    def clean_all(self, reports: list[str]) -> list["Cleaned"]:
        """Many reports -> one :class:`Cleaned` each, in order. The default calls :meth:`clean` one by one;
        a cleaner that can fail on a report (a remote LLM) returns ``status="failed"`` with the reason and the
        report unchanged, or raises, by its own setting."""
        return [Cleaned(self.clean(r)) for r in reports]


@dataclass
class Cleaned:
    """Result of cleaning one report: ``text`` (the raw report when ``status == "failed"``), ``status``
    ("ok" or "failed"), ``reason`` (why it failed), ``cached`` (answer re-used from a cache)."""

    text: str
    status: str = "ok"
    reason: str = ""
    cached: bool = False


#: kind -> base class; plugins registered for a kind must subclass it.
BASES: dict[str, type] = {
    "slide_reader": SlideReader,
    "tiler": Tiler,
    "tile_encoder": TileEncoder,
    "slide_encoder": SlideEncoder,
    "task_head": TaskHead,
    "ssl_objective": SSLObjective,
    "text_encoder": TextEncoder,
    "report_cleaner": ReportCleaner,
}

Transform = Callable[[np.ndarray], torch.Tensor]
