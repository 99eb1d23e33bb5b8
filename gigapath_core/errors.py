"""Exception hierarchy. Every error a user can cause has its own class and a one-line message.

A batch run catches :class:`SlideError` (and subclasses) per slide, records ``type(err).__name__`` and
``str(err)`` in ``manifest.csv`` and goes on with the next slide.
"""

from __future__ import annotations


class GigapathError(Exception):
    """Base class of every error raised on purpose by gigapath."""


class ConfigError(GigapathError, ValueError):
    """A config, preset or parameter is invalid. The message starts with the key path (``tiler.params.x``)."""

    def __init__(self, key_path: str, message: str):
        self.key_path = key_path
        super().__init__(f"{key_path}: {message}" if key_path else message)


class ConfigErrors(ConfigError):
    """Several config problems found at once (every pydantic error of a config, every bad stage): one
    :class:`ConfigError` per line, the first one's key path as ``key_path``. The CLI prints each line as
    ``gigapath: error: KEY: message``."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        ValueError.__init__(self, "\n".join(str(e) for e in self.errors))
        self.key_path = self.errors[0].key_path

    @classmethod
    def of(cls, errors: list[ConfigError]) -> ConfigError:
        """The single error itself, or a ConfigErrors for several (flattening nested ones)."""
        flat = [x for e in errors for x in (e.errors if isinstance(e, ConfigErrors) else [e])]
        return flat[0] if len(flat) == 1 else cls(flat)


class PluginNotFoundError(ConfigError, KeyError):
    """No plugin or preset of that kind has that name. The message lists the valid choices."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.args[0]


class PluginLoadError(GigapathError):
    """A plugin package failed to import or registered a duplicate name (reported as a warning)."""


class WeightsError(GigapathError):
    """Weights could not be found, fetched, or did not match the model (missing/unexpected keys)."""


class SlideError(GigapathError):
    """Something is wrong with one slide; a batch run records it and continues with the others.

    Attributes:
        path: the slide file.
    """

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


class SlideOpenError(SlideError):
    """No configured reader can open the file (not a slide, unsupported format or compression)."""


class MissingMppError(SlideError):
    """The slide has no usable microns-per-pixel metadata and no override was given."""


class ImplausibleMppError(SlideError):
    """The slide's mpp is outside the plausible range for tiling at the target mpp."""


class SlideReadError(SlideError):
    """Pixels could not be decoded (corrupt tile, truncated file)."""


class MaskError(SlideError):
    """The slide's annotation mask (QuPath GeoJSON, ``inputs.masks`` / manifest column ``mask``) is unusable:
    missing, not JSON, not GeoJSON features, an invalid polygon that cannot be repaired, outside the slide's
    level-0 frame, or nothing left to tile. The message names the mask file."""

    def __init__(self, path, mask_path, message: str):
        self.mask_path = str(mask_path)
        super().__init__(path, f"mask {mask_path}: {message}")


class PixelBudgetError(SlideError):
    """Building the tissue-mask thumbnail would decode more pixels than the tiler's budget allows (a huge
    slide without a pyramid level small enough): the slide is refused instead of decoding for hours."""


class FeatureFileError(SlideError):
    """A tile-feature file is unreadable or inconsistent (missing datasets, row counts that disagree,
    non-finite values); ``path`` is the feature file."""


class StageStalledError(SlideError):
    """A stage waited longer than its limit without progress (e.g. no tile batch from the reader workers within
    ``tile_encoder.batch_timeout_s``); the message names the stage, the limit and what it waited for."""


class ReaderWorkerDiedError(SlideError):
    """A worker process reading this slide's tiles died (killed, out of memory, a crash in the slide library)."""


class NonFiniteError(SlideError):
    """A model produced NaN or infinite outputs for this slide; the message names the stage, the count and the
    likely cause (weights, reduced precision). Nothing is written for that stage."""


def pydantic_message(e: dict) -> str:
    """One pydantic error's message with the value given (``"Input should be less than or equal to 1 (got 2)"``,
    ``"... (got 'sixteen')"``); a missing or empty value adds nothing."""
    from .config import short_repr

    if e.get("input") is None or e["type"] == "missing" or "(got " in e["msg"]:
        return e["msg"]
    return f"{e['msg']} (got {short_repr(e['input'])})"
