"""Pipeline configs: YAML -> strictly validated pydantic models, with key-path errors before any work.

Relative paths in a config file are resolved against the folder of that file; paths given on the command
line (``--out``, ``--set inputs.slides=[...]``) against the current directory.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from .errors import ConfigError, pydantic_message
from .yaml_load import load_yaml

#: upper bounds of integer settings (a typo such as ``1e23`` is an error at validation, not an obscure failure later)
MAX_BATCH_SIZE = 4096
MAX_WORKERS = 256
#: characters of an offending value shown in a validation error
MAX_SHOWN = 200


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StageConfig(Strict):
    """One pipeline stage: a plugin or preset name, parameter overrides, weights."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    weights: str | list[str] | None = Field(
        None, description="weights source(s); None = the preset's, 'random' = random init (recorded)"
    )

    #: keys that change how a stage runs, not what it computes: left out of its fingerprint (so adding one, or
    #: changing its value, never makes a finished output look stale)
    RUNTIME_KEYS: ClassVar[frozenset[str]] = frozenset()


class TileEncoderStage(StageConfig):
    RUNTIME_KEYS: ClassVar[frozenset[str]] = frozenset({"batch_timeout_s"})
    batch_size: StrictInt = Field(32, ge=1, le=MAX_BATCH_SIZE, description="tiles per forward pass (an integer)")
    num_workers: StrictInt | Literal["auto"] = Field(
        "auto", description="DataLoader workers reading and decoding tiles; auto = 0 on CPU (a worker competes with "
                            "the model for the same cores: measured 0.83x vs 0.92x of a bare model loop on 2 cores), "
                            "min(8, cores - 1) on CUDA")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
        if v != "auto" and v > MAX_WORKERS:
            raise ValueError(f"must be <= {MAX_WORKERS} or 'auto'")
        return v
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU (bf16 is slower on CPUs without bf16 units)"
    )
    batch_timeout_s: float = Field(
        600.0, gt=0, le=86400, description="longest wait (s) for one tile batch from the reader workers; longer "
                                         "fails the slide as stalled (StageStalledError). Without workers "
                                         "(num_workers: 0) it is the delay of a 'no progress' warning"
    )


class SlideEncoderStage(StageConfig):
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class InputsConfig(Strict):
    slides: list[str] = Field(default_factory=list, description="slide paths or glob patterns")
    manifest: str | None = Field(None, description="CSV with column slide_path (+ optional slide_id, slide_mpp, "
                                                   "mask)")
    mpp: float | None = Field(None, gt=0, description="level-0 mpp override for every slide (µm/px); with "
                              "features: µm/px of level 0 for feature files that do not record it")
    masks: str | None = Field(None, description="folder of QuPath GeoJSON annotation masks, <slide_id>.geojson "
                                                "(a manifest 'mask' cell wins); docs/slides.md")
    mask_mode: Literal["intersect", "replace"] = Field(
        "intersect", description="intersect: tissue inside the annotations; replace: the annotations instead of "
                                 "the tissue mask")
    mask_exclude: list[str] = Field(["Ignore*", "Pen*", "Artefact*", "Artifact*"],
                                    description="classification names (fnmatch, case-insensitive) cut out of the "
                                                "mask")
    features: str | None = Field(None, description="instead of slides: a folder of tile-feature files (our run, "
                                 "TRIDENT, CLAM, STAMP, prov-gigapath layouts) or a CSV with slide_id, features_path"
                                 "[, level0_mpp]; runs the slide encoder on them without tiling (docs/formats.md)")
    coords_unit: Literal["level0_px", "grid_px", "um"] | None = Field(
        None, description="with features: unit of the files' coords when their attributes do not tell it")
    tile_size: int = Field(256, ge=1, le=65536, description="with features: grid cell side in px at 0.5 µm/px")


class ExecutorConfig(Strict):
    name: str = "local"
    params: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(Strict):
    """The ``embed`` job: slides -> tiles -> tile embeddings -> slide embedding."""

    job: Literal["embed"] = "embed"
    inputs: InputsConfig
    output: str | None = Field(None, description="output folder (or --out)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    registry: list[str] = Field(default_factory=list, description="extra registry.yaml files")
    readers: list[str] = Field(["openslide", "tifffile", "pyvips"], min_length=1)
    tiler: StageConfig = Field(default_factory=lambda: StageConfig(name="otsu"))
    tile_encoder: TileEncoderStage | None = None
    slide_encoder: SlideEncoderStage | None = None
    save_tile_png: bool = Field(False, description="also write each tile as PNG under <slide>/tiles/ (the tiles "
                                "the tile encoder reads: needs a tile_encoder stage)")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d{1,4}", v):
            raise ValueError("expected auto, cpu, cuda, cuda:N (N a device index) or mps")
        return v


class SlideInput(Strict):
    """One slide to process."""

    slide_id: str
    path: str
    mpp: float | None = None
    mask: str | None = Field(None, description="QuPath GeoJSON annotation mask (absolute path), or None")


# ------------------------------------------------------------------------------------------ loading
def _key_path(loc, prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        parts.append(f"[{p}]" if isinstance(p, int) else str(p))
    return ".".join(parts).replace(".[", "[")


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the pydantic model reached from ``model`` by ``loc`` (keys and list indices), or []."""
    from typing import get_args

    node = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann, node = fields[part].annotation, None
        todo = [ann]
        while todo:  # unwrap Optional[...], list[...], dict[str, ...]
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                node = t
                break
            todo.extend(get_args(t))
        if node is None:
            return []
    return list(getattr(node, "model_fields", {}) or [])


def pydantic_errors(err: ValidationError, prefix: str = "", model: Any = None) -> ConfigError:
    """Every pydantic error -> one ConfigError per problem with a dotted key path (``tile_encoder.batch_size``),
    as a :class:`~gigapath_core.errors.ConfigErrors` when there are several. An unknown key gets a "did you
    mean" suggestion from the fields of ``model`` at its place; a missing field that is the suggestion for an
    unknown key beside it (``input:`` for ``inputs:``) is reported once, as the typo."""
    from .errors import ConfigErrors
    from .suggest import closest

    errors = err.errors()
    suggested: set[tuple] = set()
    out: list[tuple[bool, tuple, ConfigError]] = []
    for e in errors:
        loc = tuple(e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if model is not None and loc and isinstance(loc[-1], str):
                best = closest(loc[-1], _fields_at(model, loc[:-1]))
                if best is not None:
                    msg += f"; did you mean {best!r}?"
                    suggested.add(loc[:-1] + (best,))
        else:
            msg = pydantic_message(e)
        out.append((e["type"] == "missing", loc, ConfigError(_key_path(loc, prefix), msg)))
    kept = [c for missing, loc, c in out if not (missing and loc in suggested)]
    return ConfigErrors.of(kept)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, MAX_SHOWN, MAX_SHOWN
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def short_repr(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to about ``limit`` characters without building the full repr (a value built from
    shared YAML aliases can be huge once expanded)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_key(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw['a']['b']['c'] = value`` for ``dotted='a.b.c'``, creating mappings as needed."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply ``--set key.path=value`` overrides (values parsed as YAML: numbers, lists, null...)."""
    for item in sets:
        if "=" not in item:
            raise ConfigError("--set", f"expected key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        set_key(raw, key.strip(), load_yaml(value, f"--set {key.strip()}"))
    return raw


def load_raw(path: str | Path) -> dict:
    """Read a YAML config file (within the alias/size budget of :mod:`gigapath_core.yaml_load`).

    Raises:
        ConfigError: the file is missing, a folder, unreadable or not UTF-8 text, not valid YAML, over the
            YAML budget, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("", f"config path is a folder, not a YAML file: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not a UTF-8 text file (a YAML config was expected)") from None
    except OSError as err:
        raise ConfigError("", f"cannot read config {path}: {err.strerror or err}") from None
    raw = load_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    return raw


def collect_slides(inputs: InputsConfig, base: Path, output: str | Path | None = None) -> list[SlideInput]:
    """:func:`gigapath_core.slide_inputs.collect_slides` (kept here for callers that import it from config)."""
    from .slide_inputs import collect_slides as collect

    return collect(inputs, base, output)


def parse_model(model: type[BaseModel], raw: dict) -> Any:
    """``model(**raw)``; every validation error turned into a key-path ConfigError, all in one report
    (:class:`~gigapath_core.errors.ConfigErrors`), unknown keys with a "did you mean" suggestion."""
    try:
        return model(**raw)
    except ValidationError as err:
        raise pydantic_errors(err, model=model) from None


def resolve_output(cfg: Any, base: Path, out: str | None) -> None:
    """Set ``cfg.output`` to an absolute path: ``out`` (from the command line, relative to the cwd) wins over the
    config's ``output`` (relative to the config file). Raises ConfigError if neither is given, or if the path or
    one of its parents is a file (checked without writing, so ``gigapath validate`` catches it too)."""
    if out is not None:
        cfg.output = str(Path(out).resolve())
    elif cfg.output is not None:
        cfg.output = str((base / cfg.output).resolve()) if not Path(cfg.output).is_absolute() else cfg.output
    else:
        raise ConfigError("output", "no output folder: set output: in the config or pass --out DIR")
    existing = next(p for p in (Path(cfg.output), *Path(cfg.output).parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("output", f"{existing} exists and is not a folder")


def resolve_weights_source(source: str, base: Path) -> str:
    """A stage's ``weights:`` source with a relative local path made absolute against ``base`` (the config
    file's folder), like every other path in a config. ``random``, ``hf_hub:...`` and sources starting with
    ``~`` or ``$VAR`` (expanded when the weights are loaded, :func:`gigapath_core.weights.resolve_source`)
    are returned unchanged."""
    if source == "random" or source.startswith(("hf_hub:", "~", "$")) or Path(source).is_absolute():
        return source
    return str(base / source)


def _resolve_weights(cfg: Any, base: Path) -> None:
    for kind in ("tile_encoder", "slide_encoder"):
        stage = getattr(cfg, kind)
        if stage is not None and stage.weights is not None:
            w = stage.weights
            stage.weights = (resolve_weights_source(w, base) if isinstance(w, str)
                             else [resolve_weights_source(x, base) for x in w])


def load_pipeline_config(raw: dict, base: Path, out: str | None = None) -> tuple[PipelineConfig, list[SlideInput]]:
    """Validate an ``embed`` config completely (keys, types, plugin names, params, inputs).

    The slide encoder's input width (its ``input_width_param``, :mod:`gigapath_core.widths`) is filled in
    from the tile encoder, or from the first readable file of ``inputs.features``.

    Raises ConfigError with the key path of each problem found (every key/type error at once, then every
    bad stage at once, then the inputs), before any slide is touched.
    """
    from .api import validate_stage
    from .errors import ConfigErrors
    from .plugins import get_plugin_manager
    from .suggest import did_you_mean

    cfg = parse_model(PipelineConfig, raw)
    resolve_output(cfg, base, out)
    cfg.registry = [str((base / r).resolve()) for r in cfg.registry]
    problems: list[ConfigError] = []
    readers = get_plugin_manager().names("slide_reader")
    for i, r in enumerate(cfg.readers):
        if r not in readers:
            problems.append(ConfigError(f"readers[{i}]", f"unknown slide reader {r!r}; valid choices: "
                                                         f"{', '.join(readers)}{did_you_mean(r, readers)}"))
    stages = [("tiler", cfg.tiler), ("tile_encoder", cfg.tile_encoder), ("slide_encoder", cfg.slide_encoder)]
    for kind, stage in stages:
        if stage is not None:
            try:
                validate_stage(kind, stage.name, stage.params, cfg.registry, kind)
            except ConfigError as err:
                problems.append(err)
    if cfg.slide_encoder is not None and not cfg.inputs.features:
        problems += _stride_problems(cfg)
    if cfg.inputs.features:
        if cfg.inputs.slides or cfg.inputs.manifest:
            problems.append(ConfigError("inputs.features", "give either slides (inputs.slides / inputs.manifest) "
                                        "or tile features (inputs.features), not both"))
        if cfg.tile_encoder is not None:
            problems.append(ConfigError("tile_encoder", "inputs.features already holds tile embeddings; remove the "
                                        "tile_encoder stage (the slide encoder runs on the given features)"))
        if cfg.slide_encoder is None:
            problems.append(ConfigError("slide_encoder", "inputs.features needs a slide_encoder stage to run on them"))
    elif cfg.slide_encoder is not None and cfg.tile_encoder is None:
        problems.append(ConfigError("slide_encoder", "needs a tile_encoder stage (or tile features given with "
                                                     "inputs.features)"))
    if cfg.save_tile_png and cfg.tile_encoder is None:  # the PNGs are written while the tile encoder reads them
        problems.append(ConfigError("save_tile_png", "writes the tiles the tile encoder reads, and this config has "
                                    "no tile_encoder stage: add one, or remove save_tile_png"))
    if problems:
        raise ConfigErrors.of(problems)
    _resolve_weights(cfg, base)
    slides = collect_slides(cfg.inputs, base, cfg.output)
    if cfg.slide_encoder is not None:  # its name and the given params were checked above
        _fill_slide_encoder_width(cfg, slides)
    return cfg, slides


def _stride_problems(cfg: PipelineConfig) -> list[ConfigError]:
    """A tiler ``stride`` other than its ``tile_size`` (overlapping or spaced tiles) with a slide encoder: the
    slide encoders take positions on a grid of ``tile_size`` cells (LongNet's 2-D sin-cos grid, Xu et al. 2024,
    Methods: slide encoder (LongNet)), where
    overlapping tiles have no cell of their own; snapping them would put two tiles in one cell. Refused."""
    from .api import validate_params

    try:
        params = validate_params("tiler", cfg.tiler.name, cfg.tiler.params, cfg.registry, "tiler")[1]
    except ConfigError:
        return []  # reported by the tiler's own check
    stride, size = getattr(params, "stride", None), getattr(params, "tile_size", None)
    if stride is None or size is None or stride == size:
        return []
    return [ConfigError("tiler.params.stride", f"{stride} px (tile_size {size}) gives tiles off the slide encoder's "
                        f"{size}-px position grid; with a slide_encoder keep stride = tile_size, or remove the "
                        f"slide_encoder stage to embed overlapping tiles (docs/slides.md)")]


def _fill_slide_encoder_width(cfg: PipelineConfig, slides: list[SlideInput]) -> None:
    """Set the slide encoder's input width from the tile encoder (or the features) in ``cfg`` (in place)."""
    from .widths import fill_input_width, tile_encoder_width

    se = cfg.slide_encoder
    if cfg.tile_encoder is not None:
        width = tile_encoder_width(cfg.tile_encoder.name, cfg.tile_encoder.params, cfg.registry)
        source = f"the tile encoder {cfg.tile_encoder.name!r}"
    else:
        width, source = _features_width(cfg, slides), f"the features in {cfg.inputs.features}"
    se.params = fill_input_width(se.name, se.params, width, registry=cfg.registry, weights=se.weights,
                                 key_path="slide_encoder", source=source)


def _features_width(cfg: PipelineConfig, slides: list[SlideInput]) -> int | None:
    """Width of the first readable features file of ``inputs.features`` (None if none reads: each such slide
    then fails alone with its reason)."""
    from .interop import read_tile_features

    for s in slides:
        try:
            tf = read_tile_features(s.path, level0_mpp=s.mpp, coords_unit=cfg.inputs.coords_unit,
                                    tile_size=cfg.inputs.tile_size, keys={"level0_mpp": "inputs.mpp"})
        except Exception:  # noqa: BLE001 - this slide's problem is reported when it runs
            continue
        return int(tf.features.shape[1])
    return None
