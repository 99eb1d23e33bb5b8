"""Fault suite: worker processes (issue #11 items 1, 6, 7).

* a pyvips slide with DataLoader workers finishes (it hung forever when the workers were forked);
* a reader worker that stalls or dies fails its slide with a clear reason, and the run goes on;
* NaN weights fail the slide at the stage that produced them, and nothing is written for that stage;
* pool workers of the ``local`` executor die with the run when it is killed with ``kill -9``.

Every test runs under a hard limit (``signal.alarm``, and subprocess timeouts that kill the whole process
group), so a regression shows as a failure, never as a hung test run.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from gigapath_core.errors import NonFiniteError, ReaderWorkerDiedError, StageStalledError
from gigapath_core.jobs import run
from gigapath_core.store import read_h5, write_h5

GIGAPATH = Path(sys.executable).with_name("gigapath")
ROOT = Path(__file__).resolve().parent.parent
DIM = 32
TILE_ENCODER = {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
                "model_kwargs": {"depth": 1, "embed_dim": DIM, "num_heads": 2}}
LONGNET = {"in_chans": DIM, "embed_dim": 16, "depth": 1, "num_heads": 2, "segment_lengths": [16],
           "dilated_ratios": [1], "dropout": 0.0, "drop_path_rate": 0.0}
HARD_LIMIT_S = 300  # per test; the tests take seconds on an idle machine


@pytest.fixture(autouse=True)
def hard_limit():
    def fail(*_):
        raise TimeoutError(f"test exceeded its hard limit of {HARD_LIMIT_S} s (a hang?)")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(HARD_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _env() -> dict:
    return {**os.environ, "GIGAPATH_PROGRESS": "0", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])}


def run_cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """``gigapath <args>``; on timeout the whole process group (workers, forkserver) is killed."""
    p = subprocess.Popen([str(GIGAPATH), *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"gigapath {' '.join(args)} did not finish in {timeout} s (hang)")
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def manifest(out: Path) -> dict[str, dict]:
    import csv

    with open(out / "manifest.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def tile_encoder(**extra) -> dict:
    return {"name": "dinov2_vit", "weights": "random", "batch_size": 2, "num_workers": 0, "params": TILE_ENCODER,
            **extra}


# ------------------------------------------------------------------------------ pyvips with workers
@pytest.fixture(scope="module")
def png_slide(tmp_path_factory, example_slide) -> Path:
    """A 1024 x 1024 PNG cut from the bundled CC0 slide (opened by pyvips only; at 0.5 µm/px Otsu keeps 4 tiles)."""
    import openslide

    d = tmp_path_factory.mktemp("png")
    with openslide.OpenSlide(str(example_slide)) as s:
        s.read_region((0, 0), 0, (1024, 1024)).convert("RGB").save(d / "slide.png")
    return d / "slide.png"


def test_reader_start_methods():
    """Readers that are not fork-safe get forkserver workers; the others keep fork (where fork is the default)."""
    import multiprocessing

    from gigapath_core.stages.worker_start import loader_context, start_method

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the platform default start method is not fork: it is used for every reader")
    assert start_method(["pyvips"]) == "forkserver"
    assert start_method(["openslide"]) == start_method(["tifffile"]) == "fork"
    assert start_method(["openslide", "pyvips"]) == "forkserver"
    assert start_method(["no-such-reader"]) == "forkserver"  # unknown: assume the worst
    assert loader_context(["openslide"]) is None
    assert loader_context(["pyvips"]).get_start_method() == "forkserver"


def test_pyvips_slide_with_reader_workers_finishes(tmp_path, png_slide):
    """Issue #11.1: a slide read by pyvips with num_workers >= 1 hung forever (forked worker blocked in
    libvips). Now it finishes and gives the same embeddings as reading in the main process. A regression
    would show as a StageStalledError after batch_timeout_s (and the hard limit backs that up)."""
    def cfg(workers: int) -> dict:
        return {"inputs": {"slides": [str(png_slide)], "mpp": 0.5}, "device": "cpu", "readers": ["pyvips"],
                "tile_encoder": tile_encoder(num_workers=workers, batch_timeout_s=120)}

    assert run(cfg(0), out=str(tmp_path / "out-w0")) == 0  # the parent has used libvips, as in a real run
    t0 = time.monotonic()
    assert run(cfg(2), out=str(tmp_path / "out-w2")) == 0, manifest(tmp_path / "out-w2")
    row = manifest(tmp_path / "out-w2")["slide"]
    assert (row["status"], row["reader"]) == ("ok", "pyvips"), row
    assert int(row["n_tiles"]) >= 3  # >= 2 batches of 2: both workers read
    with_workers, _ = read_h5(tmp_path / "out-w2" / "slide" / "tile_embeddings.h5")
    in_main, _ = read_h5(tmp_path / "out-w0" / "slide" / "tile_embeddings.h5")
    assert with_workers["features"].shape == (int(row["n_tiles"]), DIM)
    np.testing.assert_array_equal(with_workers["features"], in_main["features"])
    print(f"pyvips slide with 2 reader workers (forkserver start included): {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------------- stalled or dead workers
_MAIN_PID = os.getpid()


def _faulty_reader(name: str, fault):
    from gigapath_plugins.readers.openslide import OpenSlideReader

    class FaultyReader(OpenSlideReader):
        """openslide, except in a DataLoader worker, where ``fault(path)`` runs first."""

        def open(self, path):
            if os.getpid() != _MAIN_PID:
                fault(path)
            wsi = super().open(path)
            wsi.reader = name
            return wsi

    FaultyReader.name = name
    return FaultyReader


def _stall(path):
    Path(path).with_name(f"worker-{os.getpid()}.pid").touch()
    time.sleep(120)


def _die(path):
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def faulty_readers(monkeypatch):
    import multiprocessing

    from gigapath_core.plugins import PluginInfo, get_plugin_manager

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the test readers are registered in this process only: forked workers inherit them")
    table = get_plugin_manager().plugins["slide_reader"]
    for name, fault in (("stall_test", _stall), ("crash_test", _die)):
        cls = _faulty_reader(name, fault)
        monkeypatch.setitem(table, name, PluginInfo("slide_reader", name, cls, __name__, "tests", "faulty"))


@pytest.mark.parametrize("reader, error, message", [
    ("stall_test", StageStalledError, "tile-embedding stage: no tile batch from the reader workers for 1 s "
                                      "(reader 'stall_test', 1 worker(s), 0 of "),
    ("crash_test", ReaderWorkerDiedError, "tile-embedding stage: a reader worker process died (reader "
                                          "'crash_test', 1 worker(s), 0 of "),
])
def test_a_stalled_or_dead_reader_worker_fails_its_slide(tmp_path, example_slide, faulty_readers, reader, error,
                                                         message):
    """The slide fails with the stage, the limit or the death named; the next slide still runs; no
    tile_embeddings.h5 is written; a stalled worker is killed, not left behind."""
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(example_slide, slides / "a.svs")
    shutil.copy(example_slide, slides / "b.svs")
    cfg = {"inputs": {"slides": [str(slides / "*.svs")]}, "device": "cpu", "readers": [reader],
           "tile_encoder": tile_encoder(num_workers=1, batch_size=64, batch_timeout_s=1)}
    t0 = time.monotonic()
    assert run(cfg, out=str(tmp_path / "out")) == 1
    elapsed = time.monotonic() - t0
    rows = manifest(tmp_path / "out")
    for sid in ("a", "b"):  # each slide fails alone, the run does not stop at the first
        row = rows[sid]
        assert row["status"] == "failed" and row["error_type"] == error.__name__, row
        assert row["reason"].startswith(f"{slides / (sid + '.svs')}: {message}"), row["reason"]
        assert (tmp_path / "out" / sid / "tiles.h5").is_file()
        assert not (tmp_path / "out" / sid / "tile_embeddings.h5").exists()
    if reader == "stall_test":
        assert "limit: tile_encoder.batch_timeout_s" in rows["a"]["reason"]
        pids = [int(p.stem.split("-")[1]) for p in slides.glob("worker-*.pid")]
        assert len(pids) == 2  # one stalled worker per slide...
        for pid in pids:  # ...killed when its slide failed (not after its 120 s sleep)
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    else:
        assert "exited unexpectedly" in rows["a"]["reason"] or "killed by signal" in rows["a"]["reason"]
    assert elapsed < 120, elapsed


def test_batch_timeout_is_validated_and_not_fingerprinted(tmp_path):
    from gigapath_core.config import load_pipeline_config
    from gigapath_core.errors import ConfigError
    from gigapath_core.pipeline import fingerprints

    (tmp_path / "x.svs").write_bytes(b"")
    base = {"inputs": {"slides": ["x.svs"]}, "tile_encoder": tile_encoder()}
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^tile_encoder\.batch_timeout_s"):
        load_pipeline_config({**base, "tile_encoder": tile_encoder(batch_timeout_s=0)}, tmp_path, out)
    a, slides = load_pipeline_config(base, tmp_path, out)
    b, _ = load_pipeline_config({**base, "tile_encoder": tile_encoder(batch_timeout_s=5)}, tmp_path, out)
    assert (a.tile_encoder.batch_timeout_s, b.tile_encoder.batch_timeout_s) == (600, 5)
    # how long to wait does not change what is computed: finished outputs stay valid
    assert fingerprints(a, slides[0]) == fingerprints(b, slides[0])


# ------------------------------------------------------------------------------------- NaN weights
def _nan_weights(tmp_path: Path, kind: str, name: str, params: dict) -> Path:
    """A local safetensors file of the model with its first parameter set to NaN."""
    import torch
    from safetensors.torch import save_file

    from gigapath_core import build

    model = build(kind, name, weights="random", **params)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first].fill_(float("nan"))
    path = tmp_path / f"{name}-nan.safetensors"
    save_file(state, str(path))
    assert torch.isnan(state[first]).all()
    return path


@pytest.mark.parametrize("slide_encoder, batch_size", [(None, 128), ("longnet", 8)], ids=["no-slide-encoder",
                                                                                          "longnet"])
def test_nan_tile_encoder_weights_fail_the_slide_at_the_tile_stage(tmp_path, example_slide, slide_encoder,
                                                                   batch_size):
    """Issue #11.6: NaN weights gave status ok with 100 % NaN features (no slide encoder), or a wrong hint
    from the slide stage (LongNet). Now the tile stage fails the slide with the encoder, weights and count."""
    weights = _nan_weights(tmp_path, "tile_encoder", "dinov2_vit", TILE_ENCODER)
    cfg = {"inputs": {"slides": [str(example_slide)]}, "device": "cpu", "readers": ["openslide"],
           "tile_encoder": tile_encoder(weights=str(weights), batch_size=batch_size)}
    if slide_encoder:
        cfg["slide_encoder"] = {"name": slide_encoder, "weights": "random", "params": LONGNET}
    out = tmp_path / "out"
    assert run(cfg, out=str(out)) == 1
    row = manifest(out)["CMU-1-Small-Region"]
    n = int(row["n_tiles"])
    assert n > batch_size if slide_encoder else n <= batch_size
    count = (f"all {batch_size} tiles of the first batch (stopped there; {n} tiles in all)" if slide_encoder
             else f"{n} of {n} tiles")
    assert row["status"] == "failed" and row["error_type"] == NonFiniteError.__name__, row
    assert row["reason"].startswith(
        f"{example_slide}: tile-embedding stage: tile encoder 'dinov2_vit' (weights {weights}) produced "
        f"non-finite embeddings (NaN/Inf) for {count}, first tile 0 at level-0 ("), row["reason"]
    assert row["reason"].endswith("check the weights (a NaN/Inf parameter or a checkpoint for another "
                                  "architecture)")  # fp32 on CPU: no precision hint
    assert "re-run" not in row["reason"]
    slide_dir = out / "CMU-1-Small-Region"
    assert (slide_dir / "tiles.h5").is_file()
    assert not (slide_dir / "tile_embeddings.h5").exists() and not (slide_dir / "slide_embedding.h5").exists()


def test_non_finite_hint_names_reduced_precision():
    """Under fp16/bf16 autocast the likely cause includes an overflow, with the key that turns it off."""
    import torch
    from torch.utils.data import Dataset

    from gigapath_core.stages.tile_embedding import embed_tiles

    class Overflow(torch.nn.Module):
        embed_dim = 2

        def forward(self, x):
            return torch.stack([x.flatten(1).sum(1), torch.full((len(x),), float("inf"))], 1)

    class Tiles(Dataset):
        slide_path, coords = "s.svs", np.array([[0, 0], [256, 0], [512, 0]])

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.ones(3, 2, 2), i, ""

    with pytest.raises(NonFiniteError) as err:
        embed_tiles(Overflow(), Tiles(), batch_size=3, num_workers=0, precision="bf16")
    assert str(err.value) == ("s.svs: tile-embedding stage: tile encoder 'Overflow' (weights ?) produced non-finite "
                              "embeddings (NaN/Inf) for 3 of 3 tiles, first tile 0 at level-0 (0, 0); check the "
                              "weights (a NaN/Inf parameter or a checkpoint for another architecture), or the bf16 "
                              "autocast overflowed: try tile_encoder.precision: fp32")


def test_nan_slide_encoder_weights_fail_the_slide_at_the_slide_stage(tmp_path, example_slide):
    weights = _nan_weights(tmp_path, "slide_encoder", "longnet", LONGNET)
    cfg = {"inputs": {"slides": [str(example_slide)]}, "device": "cpu", "readers": ["openslide"],
           "tile_encoder": tile_encoder(batch_size=128),
           "slide_encoder": {"name": "longnet", "weights": str(weights), "params": LONGNET}}
    out = tmp_path / "out"
    assert run(cfg, out=str(out)) == 1
    row = manifest(out)["CMU-1-Small-Region"]
    slide_dir = out / "CMU-1-Small-Region"
    assert row["status"] == "failed" and row["error_type"] == NonFiniteError.__name__, row
    assert row["reason"].startswith(
        f"{slide_dir / 'tile_embeddings.h5'}: slide-embedding stage: slide encoder 'longnet' (weights {weights}) "
        f"produced a non-finite slide embedding (16 of 16 values NaN/Inf) from {row['n_tiles']} finite tile "
        f"embeddings; check the weights"), row["reason"]
    tiles, _ = read_h5(slide_dir / "tile_embeddings.h5")  # the tile stage's output is kept (and finite)
    assert np.isfinite(tiles["features"]).all() and len(tiles["features"]) == int(row["n_tiles"])
    assert not (slide_dir / "slide_embedding.h5").exists()


def test_non_finite_tile_embeddings_from_elsewhere_name_their_origin(tmp_path):
    """A tile_embeddings.h5 the tile stage did not check (older gigapath, another tool): the slide stage says
    which file, how many tiles and which encoder wrote it, and how to recompute."""
    import torch

    from gigapath_core import build
    from gigapath_core.stages.slide_embedding import run_slide_embedding

    feats = np.ones((5, 4), np.float32)
    feats[[1, 3], 2] = np.nan
    write_h5(tmp_path / "tile_embeddings.h5", {"features": feats, "coords": np.arange(10).reshape(5, 2) * 256},
             {"tile_encoder": "old-encoder", "weights_source": "w.bin"})
    enc = build("slide_encoder", "mean", in_dim=4)
    with pytest.raises(NonFiniteError) as err:
        run_slide_embedding(enc, tmp_path, "tile_embeddings.h5", {}, device=torch.device("cpu"), precision="fp32")
    assert str(err.value) == (f"{tmp_path / 'tile_embeddings.h5'}: the tile embeddings are non-finite (NaN/Inf) "
                              "for 2 of 5 tiles, first tile 1, written by tile encoder 'old-encoder' (weights "
                              "w.bin); delete tile_embeddings.h5 to recompute it")
    assert not (tmp_path / "slide_embedding.h5").exists()


# ---------------------------------------------------------------------------------------- watchdogs
def test_watchdog_warns_with_stage_and_place_only_without_progress(caplog):
    from gigapath_core.watchdog import Watchdog

    caplog.set_level(logging.WARNING, logger="gigapath")
    with Watchdog("tile embedding of s.svs", 0.2, "1 reader worker(s)") as dog:
        for _ in range(12):
            time.sleep(0.05)
            dog.beat()
    assert dog.stalls == 0 and not caplog.records
    with Watchdog("tile embedding of s.svs", 0.2, "1 reader worker(s)") as dog:
        time.sleep(0.7)
    assert dog.stalls >= 1
    msg = caplog.records[0].getMessage()
    assert msg.startswith("tile embedding of s.svs: no progress for 0 s (1 reader worker(s)); still waiting "
                          "(at test_faults_workers.py:"), msg
    assert "test_watchdog_warns_with_stage_and_place_only_without_progress" in msg


def _load_watchdog_module() -> str:
    """Source that imports gigapath_core/watchdog.py by path (no torch import: the child starts in ~0.1 s)."""
    return textwrap.dedent(f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("wd", {str(ROOT / 'gigapath_core' / 'watchdog.py')!r})
        wd = importlib.util.module_from_spec(spec); spec.loader.exec_module(wd)
    """)


@pytest.mark.parametrize("pdeathsig", [True, False], ids=["prctl", "polling"])
def test_exit_with_parent(tmp_path, pdeathsig):
    """A child that called exit_with_parent dies within ~1 s of a kill -9 of its parent, by prctl or by the
    polling fallback alone; a child that did not call it lives on (the control)."""
    child = _load_watchdog_module() + textwrap.dedent(f"""
        import os, sys, time
        if sys.argv[1] == "watch":
            wd.exit_with_parent(os.getppid(), poll_s=0.2, pdeathsig={pdeathsig})
        print("ready", flush=True)
        time.sleep(60)
    """)
    (tmp_path / "child.py").write_text(child)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, {str(tmp_path / 'child.py')!r}, m], stdout=subprocess.PIPE,
                                 text=True) for m in ("watch", "control")]
        for k in kids:
            k.stdout.readline()
        print(" ".join(str(k.pid) for k in kids), flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    watched, control = (psutil.Process(int(x)) for x in p.stdout.readline().split())
    try:
        assert watched.is_running() and control.is_running()
        p.kill()
        p.wait()
        gone, _ = psutil.wait_procs([watched], timeout=5)
        assert gone, "the watched child outlived its parent"
        assert control.is_running()
    finally:
        for proc in (watched, control):
            if proc.is_running():
                proc.kill()


def test_reader_workers_die_with_a_killed_stage(tmp_path):
    """A reader worker blocked in its slide library (here: asleep) dies with the process running the stage
    when that is killed with ``kill -9`` (torch's own parent check only runs between batches)."""
    script = textwrap.dedent(f"""
        import os, time, torch
        from pathlib import Path
        from torch.utils.data import Dataset
        from gigapath_core.stages.tile_embedding import embed_tiles

        class Enc(torch.nn.Module):
            embed_dim = 4
            def forward(self, x):
                return x.flatten(1)[:, :4]

        class Asleep(Dataset):
            def __len__(self):
                return 8
            def __getitem__(self, i):
                Path({str(tmp_path)!r}, f"worker-{{os.getpid()}}.pid").touch()
                time.sleep(120)

        embed_tiles(Enc(), Asleep(), batch_size=4, num_workers=2, batch_timeout_s=600)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], env=_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("worker-*.pid"))) < 2:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = [psutil.Process(int(f.stem.split("-")[1])) for f in tmp_path.glob("worker-*.pid")]
        p.kill()
        p.wait()
        gone, alive = psutil.wait_procs(workers, timeout=5)
        assert not alive, f"reader workers outlived the killed stage: {alive}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_pool_workers_die_with_a_killed_run(tmp_path, example_slide):
    """Issue #11.7: ``kill -9`` of a run with ``workers: 2`` left both pool workers alive (1.4 GB each)."""
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(6):
        shutil.copy(example_slide, slides / f"s{i}.svs")
    cfg = {"inputs": {"slides": ["slides/*.svs"]}, "device": "cpu", "readers": ["openslide"],
           "executor": {"name": "local", "params": {"workers": 2, "threads_per_worker": 1}},
           "tile_encoder": tile_encoder(batch_size=4)}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([str(GIGAPATH), "run", "cfg.yaml", "--out", "out"], cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((tmp_path / "out").glob("s*/.gigapath.lock")):  # a pool worker is mid-slide
            assert p.poll() is None, "the run ended before a worker was caught mid-slide"
            assert time.monotonic() < deadline, "no slide started"
            time.sleep(0.05)
        workers = psutil.Process(p.pid).children(recursive=True)
        assert len([w for w in workers if "multiprocessing" in " ".join(w.cmdline())]) >= 2, workers
        p.kill()
        p.wait()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"still alive after the run was killed: {[(w.pid, w.cmdline()[-1:]) for w in alive]}"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for w in workers if "workers" in locals() else []:
            if w.is_running():
                w.kill()
