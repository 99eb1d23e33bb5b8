"""The per-slide unit of work, ``process_slide(config, slide) -> manifest row``, and the ``embed`` job.

``process_slide`` depends only on its arguments (models are cached per process, keyed by the config, and each
is built when a slide first needs it), so an executor can map it over slides anywhere. :func:`plan_slide` tells
the caller, before any model is built, which slides are done and which models the others need.

Each stage's output carries a fingerprint of the config that made it (the config, and the slide file's
identity): a re-run reuses a stage output only if the fingerprint matches, and skips a slide whose
``status.json`` says ``ok`` for the same fingerprint, the same slide file and outputs that are all still there
(:mod:`gigapath_core.markers`). Every filesystem action on a slide (lock,
clearing old outputs, the marker) happens inside its failure boundary: a slide whose folder cannot be written
fails alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from . import __version__
from .config import PipelineConfig, SlideInput
from .errors import ConfigError, FeatureFileError, GigapathError, SlideError, SlideOpenError
from .interop import FORMAT_VERSION
from .markers import identity_key, input_identity, outputs_record, stale_reason
from .slide_ids import slide_dir as checked_slide_dir
from .store import STATUS_FILE, read_h5_all, read_h5_attrs, read_status, write_status
from .stages.slide_embedding import SLIDE_FILE, embed_tile_features, run_slide_embedding
from .stages.tile_embedding import EMBEDDINGS_FILE, TileDataset, embed_tiles, write_tile_embeddings
from .masks import MaskSpec, mask_identity
from .stages.tiling import TILES_FILE, PendingQC, open_slide, start_tiling, qc_outputs_present
from .stages.worker_start import start_method

log = logging.getLogger("gigapath")


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu. Raises ConfigError if CUDA is asked for but absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ConfigError("device", f"{name!r} is not a torch device: {str(err).splitlines()[0]}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name!r} requested but torch sees no CUDA device (use device: cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError("device", f"{name!r}: torch sees {torch.cuda.device_count()} CUDA device(s) "
                                    f"(indices 0-{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device", "'mps' requested but torch sees no Apple MPS device (use device: cpu or auto)")
    return dev


def loader_workers(setting: int | str, device: torch.device) -> int:
    """DataLoader workers for tile decoding: an explicit number, or ``auto`` = 0 on CPU (decoding in the main
    process costs less than a worker competing with the model for the cores), min(8, cores - 1) on CUDA."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


#: the model stages of an ``embed`` config, in data-flow order (the tiler is always built: it is cheap)
MODEL_STAGES = ("tile_encoder", "slide_encoder")


@dataclass
class Models:
    """The tiler and encoders of one config in this process. An encoder is None when the config has no such
    stage, or until :func:`get_models` is asked for it (a re-run that reuses every tile embedding never builds
    the tile encoder)."""

    tiler: Any
    tile_encoder: Any
    slide_encoder: Any
    device: torch.device


_MODELS: dict[str, Models] = {}


def _stage_dump(stage) -> dict | None:
    return None if stage is None else stage.model_dump(exclude=set(getattr(stage, "RUNTIME_KEYS", ())))


def mask_spec(cfg: PipelineConfig, slide: SlideInput) -> MaskSpec | None:
    """The slide's annotation mask (file, ``inputs.mask_mode``, ``inputs.mask_exclude``), or None."""
    if not slide.mask:
        return None
    return MaskSpec(slide.mask, cfg.inputs.mask_mode, tuple(cfg.inputs.mask_exclude))


def _tiler_params(cfg: PipelineConfig) -> dict:
    """The tiler's parameters with every default filled in, so a changed default re-tiles old outputs."""
    from .api import validate_params

    try:
        return validate_params("tiler", cfg.tiler.name, cfg.tiler.params, cfg.registry)[1].model_dump()
    except Exception:  # validated before the run starts; keep the fingerprint total anyway
        return cfg.tiler.model_dump()


def fingerprints(cfg: PipelineConfig, slide: SlideInput, identity: dict | None = None) -> dict[str, str]:
    """Cumulative fingerprints of the tiling, tile-embedding and slide-embedding stages: the config (tiler
    parameters with their defaults), the slide file's identity (:func:`gigapath_core.markers.input_identity`)
    when given, and the annotation mask's identity (path, content sha256, mode, exclude patterns): a changed
    slide or mask file re-tiles the slide (and redoes the later stages)."""
    source = [identity_key(identity)] if identity else []
    tiling = [cfg.tiler.name, _tiler_params(cfg), slide.mpp, cfg.readers, *source]
    if slide.mask:
        tiling.append(mask_identity(mask_spec(cfg, slide)))
    if cfg.inputs.features:  # no tiling: the stage input is the feature file read with these units
        tiling = [slide.path, slide.mpp, cfg.inputs.coords_unit, cfg.inputs.tile_size, *source]
    parts = {"tiling": tiling,
             "tile_encoder": [_stage_dump(cfg.tile_encoder)], "slide_encoder": [_stage_dump(cfg.slide_encoder)]}
    out, acc = {}, []
    for k, v in parts.items():
        acc.append(v)
        out[k] = hashlib.sha1(json.dumps(acc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return out


def get_models(cfg: PipelineConfig, stages: Iterable[str] | None = None) -> Models:
    """The tiler and the encoders of ``stages`` named by ``cfg``, each built once per process, when first asked for.

    Args:
        stages: which of :data:`MODEL_STAGES` to build (None: every one the config has); stages the config lacks
            are ignored, and encoders built by an earlier call stay.
    Raises:
        ConfigError: the tile encoder's width does not match the slide encoder's input width, or a bad device.
        WeightsError: an encoder's weights cannot be loaded.
    """
    from .api import build

    key = json.dumps([cfg.tiler.model_dump(), _stage_dump(cfg.tile_encoder), _stage_dump(cfg.slide_encoder),
                      cfg.device, cfg.registry], sort_keys=True, default=str)
    models = _MODELS.get(key)
    if models is None:
        device = resolve_device(cfg.device)
        tiler = build("tiler", cfg.tiler.name, registry=cfg.registry, **cfg.tiler.params)
        _MODELS.clear()  # one config per process at a time; free the previous models
        models = _MODELS[key] = Models(tiler, None, None, device)
    for stage in MODEL_STAGES:
        if (stages is None or stage in stages) and getattr(cfg, stage) is not None and getattr(models, stage) is None:
            _build_encoder(cfg, models, stage)
    return models


def _build_encoder(cfg: PipelineConfig, models: Models, stage: str) -> None:
    """Build ``stage``'s encoder into ``models``; checks the tile/slide widths once both are built."""
    from .api import build
    from .widths import fill_input_width, tile_encoder_width, width_param

    # a fixed seed per encoder for any random initialisation, so every worker process of a run (pool, Ray
    # actors) holds the same random weights whichever encoders it builds, in any order; the caller's RNG
    # state is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if stage == "tile_encoder":
            models.tile_encoder = build("tile_encoder", cfg.tile_encoder.name, weights=cfg.tile_encoder.weights,
                                        registry=cfg.registry, **cfg.tile_encoder.params).to(models.device)
        else:
            te, params = models.tile_encoder, cfg.slide_encoder.params
            width = te.embed_dim if te is not None else None
            key = width_param(cfg.slide_encoder.name, cfg.registry)
            if width is None and cfg.tile_encoder is not None and key not in params:
                # API callers (load_pipeline_config fills it): the tile encoder's width without building it
                width = tile_encoder_width(cfg.tile_encoder.name, cfg.tile_encoder.params, cfg.registry)
            se_params = fill_input_width(cfg.slide_encoder.name, params, width, registry=cfg.registry,
                                         weights=cfg.slide_encoder.weights)
            models.slide_encoder = build("slide_encoder", cfg.slide_encoder.name, weights=cfg.slide_encoder.weights,
                                         registry=cfg.registry, **se_params).to(models.device)
    te, se = models.tile_encoder, models.slide_encoder
    if te is not None and se is not None and te.embed_dim != se.in_dim:
        models.tile_encoder = models.slide_encoder = None  # a later call meets the same error
        key = width_param(cfg.slide_encoder.name, cfg.registry)
        hint = f" (set its {key} to {te.embed_dim}, or leave it out)" if key else ""
        raise ConfigError("slide_encoder.params",
                          f"the tile encoder gives {te.embed_dim}-d embeddings but the slide encoder "
                          f"{cfg.slide_encoder.name!r} takes {se.in_dim}-d{hint}")


def _stage_ok(path: Path, fingerprint: str) -> bool:
    """A stage output can be reused: same config fingerprint and the current coordinate contract (an output
    of format version 1, written before issue #17, is redone)."""
    return _reusable_attrs(path, fingerprint) is not None


def _reusable_attrs(path: Path, fingerprint: str) -> dict | None:
    """The root attributes of a stage output that can be reused (:func:`_stage_ok`), else None."""
    if not path.is_file():
        return None
    try:
        attrs = read_h5_attrs(path)  # the attributes only: the datasets (up to GBs of features) are not read
    except Exception:
        return None
    ok = attrs.get("fingerprint") == fingerprint and int(attrs.get("format_version", 1)) == FORMAT_VERSION
    return attrs if ok else None


def plan_slide(cfg: PipelineConfig, slide: SlideInput) -> tuple[dict | None, frozenset[str]]:
    """What a run has to do for ``slide``, judged from its folder without taking its lock (so without writing).

    Returns:
        ``(the skipped row, {})`` for a slide finished by an earlier run for this config (what
        :func:`process_slide` would return), else ``(None, the model stages it needs)``: the slide encoder
        (if configured), and the tile encoder unless its ``tile_embeddings.h5`` can be reused. A slide whose
        file or folder cannot be read needs none (:func:`process_slide` fails it before any model). The
        caller builds only the models some slide needs (``gigapath run`` builds none on a run where every
        slide is done); :func:`process_slide` decides again under the lock and builds what it then needs.
    """
    try:
        slide_dir = checked_slide_dir(cfg.output, slide.slide_id)
        identity = input_identity(slide.path)
        fp = fingerprints(cfg, slide, identity)
        done, _ = _done_row(slide_dir, fp["slide_encoder"], identity)
    except Exception:  # noqa: BLE001 - process_slide reports it, with the action named
        return None, frozenset()
    if done is not None:
        return done, frozenset()
    needs = {s for s in MODEL_STAGES if getattr(cfg, s) is not None}
    if "tile_encoder" in needs and _stage_ok(slide_dir / EMBEDDINGS_FILE, fp["tile_encoder"]):
        needs.discard("tile_encoder")
    return None, frozenset(needs)


def process_slide(cfg: PipelineConfig, slide: SlideInput, on_tiles: Callable[[int, int], None] | None = None) -> dict:
    """Run every configured stage on one slide; never raises for a problem with the slide itself.

    Args:
        on_tiles: progress callback ``(done, total)`` during tile embedding.
    Returns:
        The manifest row (see :data:`gigapath_core.store.MANIFEST_FIELDS`); ``status`` is ``ok``,
        ``failed`` (with ``reason`` and ``error_type``) or ``locked`` (another live run holds the slide's
        lock, :class:`gigapath_core.executors.SlideLock`; nothing written). ``this_run`` says what this call
        did: ``processed``, ``failed``, ``locked``, or ``skipped`` (finished by an earlier run: the row is then
        that run's, with its status, reason, reader, n_tiles, weights and timings).
    Raises:
        ConfigError: a problem with the config (affects every slide).
    """
    row = _process_slide(cfg, slide, on_tiles)
    row.setdefault("this_run", "processed" if row.get("status") == "ok" else row.get("status", ""))
    return row


def _process_slide(cfg: PipelineConfig, slide: SlideInput, on_tiles: Callable[[int, int], None] | None) -> dict:
    """:func:`process_slide` without ``this_run`` (except on skipped rows).

    Every filesystem action on the slide (reading its file, the lock, clearing old outputs, the outputs, the
    marker) is inside this failure boundary: its error fails this slide only, with the action named
    (``OUT/s1: could not clear old outputs: IsADirectoryError: ...``). The failed marker is written only by
    the run that holds the slide's lock; a failure before that (an unreadable slide file) is reported in the
    row alone, leaving the folder as it was.
    """
    from .executors.slide_lock import SlideLock

    t_start = time.perf_counter()
    try:
        slide_dir = checked_slide_dir(cfg.output, slide.slide_id)
    except SlideError as err:  # an unsafe slide id (API callers; configs are checked up front): write nothing
        return _failed_row(slide, str(err), type(err).__name__)
    step, lock = "read the slide file", None
    try:
        try:
            identity = input_identity(slide.path)
        except OSError as err:
            raise SlideOpenError(slide.path, f"cannot read the file: {err.strerror or err}") from None
        fp = fingerprints(cfg, slide, identity)
        step = "read the earlier status marker"
        done, redo = _done_row(slide_dir, fp["slide_encoder"], identity)
        if done is not None:
            return done
        step = "take the slide lock"
        candidate = SlideLock(slide_dir)
        if not candidate.acquire():
            return {"slide_id": slide.slide_id, "slide_path": slide.path, "status": "locked",
                    "reason": f"being processed by another run ({candidate.describe_holder()})", "error_type": ""}
        lock = candidate  # from here on this run owns the slide folder (and writes its marker, even on failure)
        step = "read the earlier status marker"
        done, redo = _done_row(slide_dir, fp["slide_encoder"], identity)
        if done is not None:  # finished by the run that held the lock
            return done
        if lock.broke_stale:
            log.info("slide %s: took over the stale lock of a dead run (host %s pid %s)", slide.slide_id,
                     lock.broke_stale.get("host"), lock.broke_stale.get("pid"))
        if redo:
            log.warning("slide %s: %s", slide.slide_id, redo)
        step = "clear old outputs"
        clear_partial_outputs(slide_dir)
        step = "run the stages"
        row = _run_stages(cfg, slide, slide_dir, fp, t_start, on_tiles)
        if redo:
            row["reason"] = "; ".join(r for r in (redo, row["reason"]) if r)
        if row["status"] == "ok":
            step = "list the outputs"
            row.update(input=identity, outputs=outputs_record(slide_dir, STATUS_FILE))
        step = "write the status marker"
        write_status(slide_dir, row)
        return row
    except ConfigError:
        raise
    except SlideError as err:
        return _record_failure(slide_dir, _failed_row(slide, str(err), type(err).__name__), t_start, lock)
    except GigapathError:  # run-wide (e.g. weights that cannot be loaded): the caller stops the run
        raise
    except Exception as err:  # a filesystem error around the stages fails this slide only
        log.debug("slide %s failed:\n%s", slide.slide_id, traceback.format_exc())
        row = _failed_row(slide, f"{slide_dir}: could not {step}: {type(err).__name__}: {err}", type(err).__name__)
        return _record_failure(slide_dir, row, t_start, lock)
    finally:  # after the failure's marker is written
        if lock is not None:
            try:
                lock.release()
            except OSError as err:  # the work stands; a lock left behind is stale (dead pid) for the next run
                log.warning("slide %s: could not remove its lock file: %s", slide.slide_id, err)


def _record_failure(slide_dir: Path, row: dict, t_start: float, lock: Any) -> dict:
    """Finish a failed row; write it as the slide's marker if this run holds the slide's lock (only the
    holder writes in the folder). If even the marker cannot be written, the row says so."""
    row["seconds_total"] = round(time.perf_counter() - t_start, 3)
    if lock is not None:
        try:
            write_status(slide_dir, row)
        except Exception as err:
            row["reason"] += f"; and the status marker could not be written either: {type(err).__name__}: {err}"
    return row


def _failed_row(slide: SlideInput, reason: str, error_type: str) -> dict:
    return {"slide_id": slide.slide_id, "slide_path": slide.path, "status": "failed", "reason": reason,
            "error_type": error_type}


def _done_row(slide_dir: Path, final_fp: str, identity: dict) -> tuple[dict | None, str | None]:
    """``(the marker's row with this_run: skipped, None)`` if the slide's marker says ``ok`` for this config, this slide file and outputs
    that are still there; else ``(None, why an ok marker no longer holds or None)``."""
    previous = read_status(slide_dir)
    if not previous or previous.get("status") != "ok":
        return None, None
    why = stale_reason(previous, identity, slide_dir)
    if why is None and previous.get("fingerprint") == final_fp:
        return {**previous, "this_run": "skipped"}, None
    return None, why


def clear_partial_outputs(slide_dir: Path) -> None:
    """Before (re)processing a slide under its lock: delete temporary files a killed writer left behind and
    the marker of an earlier config, so no reader takes this slide as done until the new marker is written.
    Complete stage outputs stay (a stage whose fingerprint matches is reused)."""
    from .store import STATUS_FILE, TMP_PREFIX

    for p in slide_dir.rglob(f"{TMP_PREFIX}*"):
        if p.is_dir():
            import shutil

            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    (slide_dir / STATUS_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _stage_failures(row: dict, slide: SlideInput) -> Iterator[None]:
    """Record a failure of this slide's stages in ``row`` (``reason``, ``error_type``) and go on; a ConfigError
    affects every slide and propagates. An unexpected error keeps its traceback in the debug log."""
    try:
        yield
    except ConfigError:
        raise
    except GigapathError as err:
        row.update(reason=str(err), error_type=type(err).__name__)
    except Exception as err:
        log.debug("slide %s failed:\n%s", slide.slide_id, traceback.format_exc())
        row.update(reason=f"{slide.path}: unexpected {type(err).__name__}: {err}", error_type=type(err).__name__)


@contextlib.contextmanager
def _joined(qc: list[PendingQC]) -> Iterator[None]:
    """Wait for a pending QC write when a later stage fails, so that no writer outlives the slide's lock; its
    error is reported instead of the later one (it was the first error when QC was written before tiles.h5),
    except a ConfigError, which concerns every slide."""
    try:
        yield
    except BaseException as err:
        if qc:
            pending = qc.pop()
            if isinstance(err, Exception) and not isinstance(err, ConfigError):
                pending.wait()
            else:  # Ctrl-C, a config error: still joined, its own error is not the news
                with contextlib.suppress(Exception):
                    pending.wait()
        raise


def _run_stages(cfg: PipelineConfig, slide: SlideInput, slide_dir: Path, fp: dict[str, str], t_start: float,
                on_tiles: Callable[[int, int], None] | None) -> dict:
    final_fp = fp["slide_encoder"]
    row: dict[str, Any] = {"slide_id": slide.slide_id, "slide_path": slide.path, "status": "failed", "reason": "",
                           "error_type": "", "n_tiles": "", "reader": "", "weights": "", "fingerprint": final_fp}
    mpp = (slide.mpp, slide.mpp) if slide.mpp else None
    common = {"slide_id": slide.slide_id, "slide_path": slide.path, "gigapath_version": __version__}
    # the models this slide needs, built here on first need (outside the slide's failure boundary: an error
    # building a model concerns every slide); reused tile embeddings need no tile encoder
    reused = None if cfg.inputs.features else _reusable_attrs(slide_dir / EMBEDDINGS_FILE, fp["tile_encoder"])
    models = get_models(cfg, [s for s in MODEL_STAGES if not (s == "tile_encoder" and reused is not None)])
    if cfg.inputs.features:
        return _run_on_features(cfg, slide, slide_dir, fp, t_start, row, models, common)
    qc: list[PendingQC] = []  # the tiling stage's QC outputs, written while the later stages run
    with _stage_failures(row, slide), _joined(qc):
        t0 = time.perf_counter()
        with open_slide(slide.path, cfg.readers) as wsi:
            row["reader"] = wsi.reader
            if not (_stage_ok(slide_dir / TILES_FILE, fp["tiling"]) and qc_outputs_present(slide_dir)):
                qc.append(start_tiling(models.tiler, wsi, slide_dir, mpp, {**common, "fingerprint": fp["tiling"]},
                                       mask=mask_spec(cfg, slide))[1])
        tiles, tattrs, tile_dattrs = read_h5_all(slide_dir / TILES_FILE)  # datasets and attributes, one open
        n = len(tiles["coords"])
        row["n_tiles"] = n
        row["seconds_tiling"] = round(time.perf_counter() - t0, 3)
        if n == 0:
            row["reason"] = "zero tiles: no tile reaches the tissue occupancy threshold (or slide smaller than one tile)"
        if cfg.tile_encoder is not None:
            t0 = time.perf_counter()
            if reused is not None:  # the weights that made these embeddings
                row["weights"] = f"tile_encoder={reused.get('weights_source', '')}"
            else:
                te = models.tile_encoder
                row["weights"] = f"tile_encoder={te.weights_source}"
                ds = TileDataset(slide.path, row["reader"], models.tiler, tiles["coords"], int(tattrs["level"]),
                                 int(tattrs["read_size"]), int(tattrs["tile_size"]), te.transform)
                done = [0]

                def tick(k: int) -> None:
                    done[0] += k
                    if on_tiles:
                        on_tiles(done[0], n)

                workers = loader_workers(cfg.tile_encoder.num_workers, models.device)
                if workers and qc and start_method([row["reader"]]) == "fork":
                    qc.pop().wait()  # a child forked mid-write would inherit the QC thread's locks held
                try:  # the dataset's own slide handle (read in this process without workers) is closed always
                    feats = embed_tiles(te, ds, batch_size=cfg.tile_encoder.batch_size, num_workers=workers,
                                        device=models.device, precision=cfg.tile_encoder.precision, on_batch=tick,
                                        batch_timeout_s=cfg.tile_encoder.batch_timeout_s)
                    if cfg.save_tile_png:
                        _save_tile_pngs(ds, slide_dir / "tiles", tiles["grid_coords"])
                finally:
                    ds.close()
                write_tile_embeddings(slide_dir / EMBEDDINGS_FILE, feats, tiles["coords"], tiles["grid_coords"],
                                      {**common, "fingerprint": fp["tile_encoder"], "tile_encoder": cfg.tile_encoder.name,
                                       "weights_source": te.weights_source, "embed_dim": int(te.embed_dim),
                                       "coords_unit": "level-0 px (top-left corner)",
                                       "grid_coords_unit": f"px at {float(tattrs['target_mpp'])} um/px",
                                       "tile_size": int(tattrs["tile_size"]), "target_mpp": float(tattrs["target_mpp"]),
                                       "reader": row["reader"]},
                                      {k: tile_dattrs[k] for k in ("coords", "grid_coords")})
            row["seconds_tile_encoder"] = round(time.perf_counter() - t0, 3)
        if cfg.slide_encoder is not None and n > 0:
            t0 = time.perf_counter()
            se = models.slide_encoder
            row["weights"] += f"; slide_encoder={se.weights_source}"
            run_slide_embedding(se, slide_dir, EMBEDDINGS_FILE, _slide_attrs(cfg, se, common, fp),
                                device=models.device, precision=cfg.slide_encoder.precision)
            row["seconds_slide_encoder"] = round(time.perf_counter() - t0, 3)
        if qc:
            qc.pop().wait()  # before status ok: a QC write error fails the slide
        row["status"] = "ok"
    row["seconds_total"] = round(time.perf_counter() - t_start, 3)
    return row


def _slide_attrs(cfg: PipelineConfig, se, common: dict, fp: dict[str, str]) -> dict:
    """Attributes of ``slide_embedding.h5``: provenance, the stage fingerprint, the encoder and its weights."""
    return {**common, "fingerprint": fp["slide_encoder"], "slide_encoder": cfg.slide_encoder.name,
            "weights_source": se.weights_source, "embed_dim": int(se.embed_dim)}


def _run_on_features(cfg: PipelineConfig, slide: SlideInput, slide_dir: Path, fp: dict[str, str], t_start: float,
                     row: dict, models: Models, common: dict) -> dict:
    """``inputs.features``: slide-encode an existing tile-feature file (``slide.path``, any supported tool's
    layout) without tiling; writes ``slide_embedding.h5`` (the caller writes ``status.json``)."""
    from .interop import read_tile_features

    se = models.slide_encoder
    with _stage_failures(row, slide):
        t0 = time.perf_counter()
        try:
            tf = read_tile_features(slide.path, level0_mpp=slide.mpp, coords_unit=cfg.inputs.coords_unit,
                                    tile_size=cfg.inputs.tile_size, key_prefix="inputs.",
                                    keys={"level0_mpp": "inputs.mpp"})
        except ConfigError as err:  # this file's units (the message names the key): that slide fails alone
            raise FeatureFileError(slide.path, str(err)) from None
        row.update(n_tiles=len(tf), reader=f"features:{tf.source_format}", weights=f"slide_encoder={se.weights_source}")
        if len(tf) == 0:
            row["reason"] = "zero tiles in the feature file"
        else:
            embed_tile_features(se, tf, slide_dir, _slide_attrs(cfg, se, common, fp),
                                device=models.device, precision=cfg.slide_encoder.precision)
        row["seconds_slide_encoder"] = round(time.perf_counter() - t0, 3)
        row["status"] = "ok"
    row["seconds_total"] = round(time.perf_counter() - t_start, 3)
    return row


def _save_tile_pngs(ds: TileDataset, folder: Path, grid_coords: np.ndarray) -> None:
    from .store import write_png

    for i in range(len(ds)):
        x, y = grid_coords[i]
        write_png(folder / f"{x}x_{y}y.png", ds.read(i))


def is_slide_error(row: dict) -> bool:
    return row.get("status") == "failed"


__all__ = ["process_slide", "plan_slide", "get_models", "MODEL_STAGES", "resolve_device", "fingerprints", "SlideError"]
