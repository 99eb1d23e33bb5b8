"""Crash safety of batch runs: per-slide locks (stale-lock recovery), ``kill -9`` of a whole run mid-slide
then a re-run, partial files never taken as done, and two runs sharing one output folder.

Slides are copies of the bundled CC0 slide, so every copy's outputs must be byte-identical to every other's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gigapath_core.config import load_pipeline_config
from gigapath_core.executors import LocalExecutor, SlideLock, map_until_done
from gigapath_core.executors.slide_lock import LOCK_FILE, identity
from gigapath_core.jobs import run
from gigapath_core.pipeline import process_slide
from gigapath_core.store import read_h5, read_status

GIGAPATH = Path(sys.executable).with_name("gigapath")
DIM = 32
N = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, example_slide):
    d = tmp_path_factory.mktemp("crash")
    (d / "slides").mkdir()
    for i in range(N):
        shutil.copy(example_slide, d / "slides" / f"s{i}.svs")
    cfg = {"inputs": {"slides": ["slides/*.svs"]}, "device": "cpu", "readers": ["openslide"],
           "tile_encoder": {"name": "dinov2_vit", "weights": "random", "batch_size": 8, "num_workers": 0,
                            "params": {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
                                       "model_kwargs": {"depth": 1, "embed_dim": DIM, "num_heads": 2}}},
           "slide_encoder": {"name": "mean", "params": {"in_dim": DIM}, "weights": "random"}}
    (d / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return d


def _env() -> dict:
    return {**os.environ, "GIGAPATH_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}


def _same_h5(a: Path, b: Path) -> bool:
    da, _ = read_h5(a)
    db, _ = read_h5(b)
    return sorted(da) == sorted(db) and all(da[k].tobytes() == db[k].tobytes() for k in da)


# -------------------------------------------------------------------------------------------- locks
def test_lock_excludes_a_second_holder_and_names_the_first(tmp_path):
    a, b = SlideLock(tmp_path), SlideLock(tmp_path)
    assert a.acquire()
    info = json.loads((tmp_path / LOCK_FILE).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not b.acquire()  # this process is alive: not stale
    assert b.describe_holder() == f"host {socket.gethostname()} pid {os.getpid()}"
    a.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert b.acquire() and b.broke_stale is None
    b.release()


def _write_lock(folder: Path, **fields) -> None:
    (folder / LOCK_FILE).write_text(json.dumps({**identity(), "token": "x", "created": 0, **fields}))


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # its pid is now free
    _write_lock(tmp_path, pid=p.pid, pid_start="1")
    lock = SlideLock(tmp_path)
    assert lock.acquire()
    assert lock.broke_stale["pid"] == p.pid
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.token
    lock.release()


def test_lock_of_a_reused_pid_is_stale(tmp_path):
    # a live pid (our parent) whose start time differs from the one recorded: the pid was reused
    _write_lock(tmp_path, pid=os.getppid(), pid_start="1")
    lock = SlideLock(tmp_path)
    assert lock.acquire() and lock.broke_stale["pid"] == os.getppid()
    lock.release()


def test_lock_from_another_machine_goes_stale_only_without_heartbeat(tmp_path):
    _write_lock(tmp_path, host="node-17", pid=1, boot_id="other", pid_ns="other")
    lock = SlideLock(tmp_path, stale_after=600)
    assert not lock.acquire()
    assert "node-17" in lock.describe_holder()
    old = time.time() - 700  # last heartbeat 700 s ago > stale_after
    os.utime(tmp_path / LOCK_FILE, (old, old))
    assert lock.acquire() and lock.broke_stale["host"] == "node-17"
    lock.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lock = SlideLock(tmp_path, heartbeat=0.05)
    assert lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    lock.release()


def test_locked_slide_is_not_touched_then_picked_up(workdir, tmp_path):
    cfg, slides = load_pipeline_config(yaml.safe_load((workdir / "cfg.yaml").read_text()), workdir, str(tmp_path))
    slide = slides[0]
    other_run = SlideLock(tmp_path / slide.slide_id)
    assert other_run.acquire()
    row = process_slide(cfg, slide)
    assert row["status"] == "locked" and f"pid {os.getpid()}" in row["reason"]
    assert sorted(p.name for p in (tmp_path / slide.slide_id).iterdir()) == [LOCK_FILE]  # nothing written
    waits: list = []
    threading.Timer(0.5, other_run.release).start()  # the other run ends without finishing the slide
    rows = list(map_until_done(LocalExecutor(), process_slide, cfg, [slide], poll_s=0.2, on_wait=waits.append))
    assert [r["status"] for r in rows] == ["ok"] and waits and waits[0] == [slide.slide_id]


# ------------------------------------------------------------------------------------- kill -9 a run
def _wait_then_kill(proc: subprocess.Popen, cond, timeout: float = 240) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    return False


def test_kill_9_of_the_whole_run_mid_slide_then_rerun(workdir):
    out = workdir / "out-kill"
    proc = subprocess.Popen([str(GIGAPATH), "run", str(workdir / "cfg.yaml"), "--out", str(out)],
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def mid_s1() -> bool:  # s0 finished, s1 tiled but not yet embedded
        s0 = read_status(out / "s0")
        return bool(s0 and s0["status"] == "ok") and (out / "s1" / "tiles.h5").exists()

    killed = _wait_then_kill(proc, mid_s1)
    assert killed, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert read_status(out / "s1") is None  # no marker for the interrupted slide
    assert (out / "s1" / LOCK_FILE).exists()  # left by the dead run
    # a partial file under a final name (e.g. copied by hand) and a temp file of a killed writer
    (out / "s2").mkdir(exist_ok=True)
    good = (out / "s0" / "tile_embeddings.h5").read_bytes()
    (out / "s2" / "tile_embeddings.h5").write_bytes(good[: len(good) // 2])
    (out / "s2" / ".gigapath-tmp-slide_embedding.h5.abc").write_bytes(b"partial")
    done_before = {p: p.stat().st_mtime_ns for p in (out / "s0").iterdir()}

    assert run(str(workdir / "cfg.yaml"), out=str(out)) == 0
    rows = {r["slide_id"]: r for r in _manifest(out)}
    assert [rows[s]["status"] for s in ("s0", "s1", "s2")] == ["ok", "ok", "ok"]
    assert [rows[s]["this_run"] for s in ("s0", "s1", "s2")] == ["skipped", "processed", "processed"]
    assert {p: p.stat().st_mtime_ns for p in (out / "s0").iterdir()} == done_before  # not recomputed
    for sid in ("s1", "s2"):  # same slide bytes as s0 -> same outputs
        for name in ("tiles.h5", "tile_embeddings.h5", "slide_embedding.h5"):
            assert _same_h5(out / sid / name, out / "s0" / name), f"{sid}/{name}"
    assert not list(out.rglob(".gigapath-tmp-*")) and not list(out.rglob(LOCK_FILE))


def _manifest(out: Path, name: str = "manifest.csv") -> list[dict]:
    import csv

    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def test_two_runs_on_one_folder_process_each_slide_once(workdir):
    out = workdir / "out-twice"
    cmd = [str(GIGAPATH), "run", str(workdir / "cfg.yaml"), "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        logs.append(err.decode())
    counts = [tuple(int(x) for x in re.search(r"(\d+) ok, (\d+) skipped, (\d+) failed", log).groups())
              for log in logs]
    assert sum(c[0] for c in counts) == N, counts  # every slide computed by exactly one of the two runs
    assert all(c[0] + c[1] == N and c[2] == 0 for c in counts), counts
    for i in range(N):
        assert read_status(out / f"s{i}")["status"] == "ok"
        assert _same_h5(out / f"s{i}" / "tile_embeddings.h5", out / "s0" / "tile_embeddings.h5")
