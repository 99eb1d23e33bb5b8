"""Pipeline configs: YAML -> strictly validated pydantic models, with key-path errors before any work.

Relative paths in a config file are resolved against the folder of that file; paths given on the command
line (``--out``, ``--set inputs.slides=[...]``) against the current directory.
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


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
    batch_size: int = Field(32, ge=1)
    num_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader workers reading and decoding tiles; auto = 0 on CPU (a worker competes with "
                            "the model for the same cores: measured 0.83x vs 0.92x of a bare model loop on 2 cores), "
                            "min(8, cores - 1) on CUDA")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("must be >= 0 or 'auto'")
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
    manifest: str | None = Field(None, description="CSV with column slide_path (+ optional slide_id, slide_mpp)")
    mpp: float | None = Field(None, gt=0, description="level-0 mpp override for every slide (µm/px)")


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
    save_tile_png: bool = Field(False, description="also write each tile as PNG under <slide>/tiles/")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return v


class SlideInput(Strict):
    """One slide to process."""

    slide_id: str
    path: str
    mpp: float | None = None


# ------------------------------------------------------------------------------------------ loading
def pydantic_error(err: ValidationError, prefix: str = "") -> ConfigError:
    """First pydantic error -> ConfigError with a dotted key path (``tile_encoder.batch_size``)."""
    e = err.errors()[0]
    parts = [prefix] if prefix else []
    for p in e["loc"]:
        parts.append(f"[{p}]" if isinstance(p, int) else str(p))
    path = ".".join(parts).replace(".[", "[")
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e.get("input") is not None and e["type"] not in ("missing",):
        msg = f"{msg} (got {e['input']!r})"
    return ConfigError(path, msg)


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
        set_key(raw, key.strip(), yaml.safe_load(value))
    return raw


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError("", f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    return raw


def _slide_id(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def collect_slides(inputs: InputsConfig, base: Path) -> list[SlideInput]:
    """Expand paths, globs and the CSV manifest into SlideInputs (input order, duplicates removed).

    Raises ConfigError (``inputs.slides[i]`` / ``inputs.manifest``) for a path or pattern that matches no
    file, a manifest without ``slide_path``, or two slides with the same slide_id.
    """
    slides: list[SlideInput] = []
    for i, pattern in enumerate(inputs.slides):
        p = Path(pattern).expanduser()
        p = p if p.is_absolute() else base / p
        if glob.has_magic(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise ConfigError(f"inputs.slides[{i}]", f"no file matches {pattern!r} (looked in {p.parent})")
        elif p.exists():
            matches = [p]
        else:
            raise ConfigError(f"inputs.slides[{i}]", f"slide not found: {p}")
        slides += [SlideInput(slide_id=_slide_id(m), path=str(m.resolve()), mpp=inputs.mpp) for m in matches]
    if inputs.manifest:
        mpath = Path(inputs.manifest).expanduser()
        mpath = mpath if mpath.is_absolute() else base / mpath
        try:
            with open(mpath, newline="") as f:
                rows = list(csv.DictReader(f))
        except FileNotFoundError:
            raise ConfigError("inputs.manifest", f"manifest not found: {mpath}") from None
        if rows and "slide_path" not in rows[0]:
            raise ConfigError("inputs.manifest", f"{mpath} needs a 'slide_path' column (has {', '.join(rows[0])})")
        for j, row in enumerate(rows):
            sp = Path(row["slide_path"]).expanduser()
            sp = sp if sp.is_absolute() else mpath.parent / sp
            if not sp.exists():
                raise ConfigError(f"inputs.manifest[row {j + 2}]", f"slide not found: {sp}")
            mpp = row.get("slide_mpp") or None
            try:
                mpp_value = float(mpp) if mpp else inputs.mpp
            except ValueError:
                raise ConfigError(f"inputs.manifest[row {j + 2}].slide_mpp", f"not a number: {mpp!r}") from None
            slides.append(SlideInput(slide_id=row.get("slide_id") or _slide_id(sp), path=str(sp.resolve()), mpp=mpp_value))
    seen: dict[str, str] = {}
    unique = []
    for s in slides:
        if s.slide_id in seen:
            if seen[s.slide_id] == s.path:
                continue
            raise ConfigError("inputs", f"two slides share slide_id {s.slide_id!r}: {seen[s.slide_id]} and {s.path}")
        seen[s.slide_id] = s.path
        unique.append(s)
    if not unique:
        raise ConfigError("inputs", "no slides given (inputs.slides or inputs.manifest)")
    return unique


def parse_model(model: type[BaseModel], raw: dict) -> Any:
    """``model(**raw)`` with the first validation error turned into a key-path ConfigError."""
    try:
        return model(**raw)
    except ValidationError as err:
        raise pydantic_error(err) from None


def resolve_output(cfg: Any, base: Path, out: str | None) -> None:
    """Set ``cfg.output`` to an absolute path: ``out`` (from the command line, relative to the cwd) wins over the
    config's ``output`` (relative to the config file). Raises ConfigError if neither is given."""
    if out is not None:
        cfg.output = str(Path(out).resolve())
    elif cfg.output is not None:
        cfg.output = str((base / cfg.output).resolve()) if not Path(cfg.output).is_absolute() else cfg.output
    else:
        raise ConfigError("output", "no output folder: set output: in the config or pass --out DIR")


def load_pipeline_config(raw: dict, base: Path, out: str | None = None) -> tuple[PipelineConfig, list[SlideInput]]:
    """Validate an ``embed`` config completely (keys, types, plugin names, params, inputs).

    Raises ConfigError with the key path of the first problem, before any slide is touched.
    """
    from .api import validate_stage
    from .plugins import get_plugin_manager

    cfg = parse_model(PipelineConfig, raw)
    resolve_output(cfg, base, out)
    cfg.registry = [str((base / r).resolve()) for r in cfg.registry]
    readers = get_plugin_manager().names("slide_reader")
    for i, r in enumerate(cfg.readers):
        if r not in readers:
            raise ConfigError(f"readers[{i}]", f"unknown slide reader {r!r}; valid choices: {', '.join(readers)}")
    validate_stage("tiler", cfg.tiler.name, cfg.tiler.params, cfg.registry, "tiler")
    for kind in ("tile_encoder", "slide_encoder"):
        stage = getattr(cfg, kind)
        if stage is not None:
            validate_stage(kind, stage.name, stage.params, cfg.registry, kind)
    if cfg.slide_encoder is not None and cfg.tile_encoder is None:
        raise ConfigError("slide_encoder", "needs a tile_encoder stage")
    slides = collect_slides(cfg.inputs, base)
    return cfg, slides
