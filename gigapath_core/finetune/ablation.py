"""The ``ablation`` job: several finetune variants on the same folds, one side-by-side table (Xu et al. 2024, Methods:
mutation prediction, cancer subtyping).

Config::

    job: ablation
    base: finetune.yaml            # a finetune config (path, relative to this file) or an inline mapping
    output: ../out/ablation
    reference: longnet             # H1 of each test: the reference beats the variant (default: first variant)
    metrics: [auroc, auprc, bacc]
    variants:                      # name -> dotted overrides of the base config (values replace whole subtrees)
      longnet:    {}
      abmil_only: {model.slide_encoder: null}
      mean:       {model.slide_encoder: {name: mean}, model.head: {name: linear}}
      other_tiles: {data.embeddings: ../out/ctranspath_embed}

Every variant is validated and passes the finetune pre-flight (data, folds, output folder, model: the checks
``gigapath validate`` runs, :func:`check_ablation`) before anything is written; the folds are made once
(``OUT/splits.csv``) and shared.
Each variant writes a full finetune output into ``OUT/<variant>/``; the comparison goes to ``OUT/ablation.md``,
``ablation.csv`` and ``ablation.json`` (one-sided Wilcoxon signed-rank p-values of reference vs each variant).
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..config import Strict, load_raw, parse_model, resolve_output, set_key
from ..errors import ConfigError, ConfigErrors
from ..evaluation.folds import write_splits
from ..evaluation.tables import ablation_rows, print_table, to_csv, to_markdown
from ..progress import console
from ..report import try_write_run_report
from ..store import write_bytes, write_json
from .config import FinetuneConfig, absolutize_paths, load_finetune_config
from .data import FinetuneData, load_data
from .preflight import Checked, check_finetune, choose_splits

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class AblationConfig(Strict):
    job: Literal["ablation"] = "ablation"
    base: str | dict[str, Any] = Field(description="finetune config file (relative to this file) or mapping")
    variants: dict[str, dict[str, Any]] = Field(min_length=2, description="name -> dotted overrides of the base")
    reference: str | None = Field(None, description="variant the others are tested against (default: first)")
    metrics: list[str] = Field(default_factory=lambda: ["auroc", "auprc", "bacc"], min_length=1)
    output: str | None = None


def load_ablation_config(raw: dict, base: Path, out: str | None = None
                         ) -> tuple[AblationConfig, dict[str, FinetuneConfig]]:
    """Validate the ablation config and every variant's finetune config. Raises ConfigError (key path)."""
    cfg = parse_model(AblationConfig, raw)
    resolve_output(cfg, base, out)
    if isinstance(cfg.base, str):
        base_path = Path(cfg.base).expanduser()
        base_path = base_path if base_path.is_absolute() else base / base_path
        if not base_path.is_file():
            raise ConfigError("base", f"finetune config not found: {base_path}")
        base_raw, base_dir = load_raw(base_path), base_path.parent
    else:
        base_raw, base_dir = dict(cfg.base), base
    if base_raw.get("job", "finetune") != "finetune":
        raise ConfigError("base.job", f"the base of an ablation must be a finetune config, got job {base_raw['job']!r}")
    base_raw = absolutize_paths({**base_raw, "job": "finetune"}, base_dir)
    cfg.reference = cfg.reference or next(iter(cfg.variants))
    if cfg.reference not in cfg.variants:
        raise ConfigError("reference", f"unknown variant {cfg.reference!r}; variants: {', '.join(cfg.variants)}")
    variants: dict[str, FinetuneConfig] = {}
    for name, overrides in cfg.variants.items():
        if not _NAME.match(name):
            raise ConfigError(f"variants.{name}", "variant names are folder names: letters, digits, . _ - only")
        raw_v = copy.deepcopy(base_raw)
        for key, value in (overrides or {}).items():
            if key == "folds" or key.startswith("folds."):
                raise ConfigError(f"variants.{name}.{key}", "variants share the folds; set folds in the base config")
            set_key(raw_v, key, copy.deepcopy(value))
        raw_v = absolutize_paths(raw_v, base)  # paths in the overrides are relative to the ablation file
        with under_variant(name):
            variants[name] = load_finetune_config(raw_v, base, out=str(Path(cfg.output) / name))
    return cfg, variants


@contextlib.contextmanager
def under_variant(name: str):
    """Re-raise a ConfigError under the variant's key: ``variants.<name>: <key path>: ...`` (each problem of a
    ConfigErrors keeps its own line)."""
    try:
        yield
    except ConfigError as err:
        raise ConfigErrors.of([ConfigError(f"variants.{name}", str(e))
                               for e in (err.errors if isinstance(err, ConfigErrors) else [err])]) from None


def check_ablation(cfg: AblationConfig, variants: dict[str, FinetuneConfig]) -> dict[str, Checked]:
    """The finetune pre-flight of every variant (:func:`.preflight.check_finetune`) on the shared folds, before
    anything is written: the folds are made (or read) once, from the first variant's data, and every variant's
    data is checked against them. Variants with the same ``data`` share one load of it.

    Returns variant name -> Checked (its ``cfg`` has ``folds.splits`` set to the shared splits file, as the run
    uses it). Raises ConfigError under ``variants.<name>``.
    """
    names = list(variants)
    first = variants[names[0]]
    shared = first.folds.splits or str(Path(cfg.output) / "splits.csv")
    source = first.folds.splits or f"the shared folds (made from variant {names[0]!r}'s data)"
    loaded: dict[str, FinetuneData] = {}
    splits = None
    checked: dict[str, Checked] = {}
    for name, vcfg in variants.items():
        with under_variant(name):
            key = vcfg.data.model_dump_json()
            if key not in loaded:
                loaded[key] = load_data(vcfg.data)
            if splits is None:  # the first variant's folds, made or read, are everyone's
                splits = choose_splits(vcfg, loaded[key])
            vcfg = vcfg.model_copy(update={"folds": vcfg.folds.model_copy(update={"splits": shared})})
            checked[name] = check_finetune(vcfg, loaded[key], splits, source)
    return checked


def prepare_ablation(raw: dict, base: Path, out: str | None
                     ) -> tuple[AblationConfig, dict[str, FinetuneConfig], dict[str, Checked]]:
    """Load and check an ablation config and every variant (``gigapath run`` and ``gigapath validate``)."""
    cfg, variants = load_ablation_config(raw, base, out)
    return cfg, variants, check_ablation(cfg, variants)


def run_ablation(raw: dict, base: Path, out: str | None, options: dict) -> int:
    """``gigapath run`` entry point of ``job: ablation``: the pre-flight of every variant (as ``gigapath
    validate``), then the run. Returns 0."""
    cfg, variants, checked = prepare_ablation(raw, base, out)
    ablation(cfg, variants, checked)
    return 0


def ablation(cfg: AblationConfig, variants: dict[str, FinetuneConfig],
             checked: dict[str, Checked] | None = None) -> dict[str, Any]:
    """Run every variant on shared folds and write the comparison. Returns the ablation.json content.

    ``checked``: :func:`check_ablation`'s result (run here when None); nothing is written before it passes.
    """
    from .encoder_cache import FrozenEncoderCache
    from .runner import finetune

    checked = checked if checked is not None else check_ablation(cfg, variants)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(checked.values()))
    shared = first.cfg.folds.splits
    if next(iter(variants.values())).folds.splits is None:  # made by the pre-flight: OUT/splits.csv, shared
        write_splits(shared, first.splits)
    summaries, notes = {}, {}
    # one cache for every variant: a frozen encoder shared by variants runs once per slide (keys tell them apart)
    cache = FrozenEncoderCache(max_bytes=int(max(v.encoder_cache_gb for v in variants.values()) * (1 << 30)))
    for i, (name, chk) in enumerate(checked.items()):
        console.rule(f"variant {i + 1}/{len(checked)}: {name}")
        metrics = finetune(chk.cfg, encoder_cache=cache, checked=chk)
        summaries[name] = metrics["summary"]
        notes[name] = metrics["notes"]
    header, rows, tests = ablation_rows(summaries, cfg.reference, cfg.metrics)
    k = len(next(iter(summaries.values())).get(cfg.metrics[0], {}).get("folds", []))
    caption = (f"mean ± s.e.m. over {k} shared folds; p: one-sided Wilcoxon signed-rank test that "
               f"{cfg.reference!r} is better than the variant")
    all_notes = sorted({n for ns in notes.values() for n in ns})
    print_table("Ablation", header, rows, caption=caption)
    md = f"# Ablation\n\n{caption}.\n\n" + to_markdown(header, rows) + "".join(f"\n> Note: {n}\n" for n in all_notes)
    write_bytes(out / "ablation.md", md.encode())
    write_bytes(out / "ablation.csv", to_csv(header, rows).encode())
    result = {"reference": cfg.reference, "metrics": cfg.metrics, "splits": shared, "variants": summaries,
              "tests": tests, "notes": all_notes}
    write_json(out / "ablation.json", result)
    try_write_run_report(out)  # OUT/report.html (links each variant's own report)
    console.print(f"ablation table -> {out / 'ablation.md'}")
    return result
