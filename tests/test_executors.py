"""Executors: the same contract for ``local`` (in-process and process pool) and ``ray``.

Slides are copies of the bundled CC0 slide (CMU-1-Small-Region.svs) plus one unreadable file from the shared
test data, so every good slide must give byte-identical outputs to every other copy and to every executor.
The Ray cluster is local, bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, checked below), with a
fake GPU resource, and its temp dir inside the workspace.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray is imported: bind loopback only

import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gigapath_core.errors import ConfigError
from gigapath_core.executors import get_executor, parse_shard, shard_slides
from gigapath_core.jobs import run
from gigapath_core.store import read_h5, read_status

ROOT = Path(__file__).resolve().parent.parent
N_GOOD = 3
DIM = 48
TILE_ENCODER = {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
                "model_kwargs": {"depth": 1, "embed_dim": DIM, "num_heads": 2}}
H5 = ("tiles.h5", "tile_embeddings.h5", "slide_embedding.h5")


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory, example_slide, shared_data):
    d = tmp_path_factory.mktemp("executors")
    slides = d / "slides"
    slides.mkdir()
    for i in range(N_GOOD):
        shutil.copy(example_slide, slides / f"s{i}.svs")
    # random ASCII named .svs (PROVENANCE.md): no reader can open it
    shutil.copy(shared_data / "bad-slides" / "broken-random-ascii.svs", slides / "bad.svs")
    from safetensors.torch import save_file

    from gigapath_core import build

    import torch

    torch.manual_seed(123)
    enc = build("tile_encoder", "dinov2_vit", weights="random", **TILE_ENCODER)
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(d / "tile_encoder.safetensors"))
    return d


def config(workdir: Path, **executor) -> dict:
    return {"inputs": {"slides": [str(workdir / "slides" / "*.svs")]}, "device": "cpu", "readers": ["openslide"],
            "tile_encoder": {"name": "dinov2_vit", "params": TILE_ENCODER,
                             "weights": str(workdir / "tile_encoder.safetensors"), "batch_size": 16, "num_workers": 0},
            "slide_encoder": {"name": "mean", "params": {"in_dim": DIM}, "weights": "random"},
            **({"executor": executor} if executor else {})}


@pytest.fixture(scope="module")
def reference(workdir):
    """The default executor (local, in-process) on every slide."""
    out = workdir / "out-local"
    assert run(config(workdir), out=str(out)) == 1  # 1: the bad slide failed
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # short path inside the workspace: Ray's unix socket paths are limited to ~107 characters
    tmp = tempfile.mkdtemp(prefix=".ray-", suffix=".tmp", dir=ROOT)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING")
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def manifest(out: Path) -> dict[str, dict]:
    import csv

    with open(out / "manifest.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def assert_same_outputs(out: Path, ref: Path) -> None:
    """Every dataset of every good slide byte-identical to the reference run and to the copy s0."""
    for i in range(N_GOOD):
        for name in H5:
            got, _ = read_h5(out / f"s{i}" / name)
            for other in (ref / f"s{i}" / name, ref / "s0" / name):
                want, _ = read_h5(other)
                assert sorted(got) == sorted(want), name
                for k in want:
                    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (name, k)
                    assert got[k].tobytes() == want[k].tobytes(), f"s{i}/{name}:{k} differs from {other}"


def assert_contract(out: Path) -> None:
    rows = manifest(out)
    assert list(rows) == ["bad"] + [f"s{i}" for i in range(N_GOOD)]  # input order (sorted glob)
    assert rows["bad"]["status"] == "failed" and rows["bad"]["error_type"] == "SlideOpenError"
    assert "bad.svs" in rows["bad"]["reason"]
    for i in range(N_GOOD):
        assert rows[f"s{i}"]["status"] == "ok", rows[f"s{i}"]
        # 2220 x 2967 px at 0.499 µm/px -> 8 x 11 grid of 256-px tiles at 0.5 µm/px (PROVENANCE.md); Otsu
        # keeps the tissue tiles only
        assert 0 < int(rows[f"s{i}"]["n_tiles"]) <= 88
    assert not list(out.rglob(".gigapath-tmp-*")) and not list(out.rglob(".gigapath.lock"))


# ------------------------------------------------------------------------------------ shard, lookup
def test_shard_is_a_deterministic_stride():
    items = list("abcdefg")
    assert shard_slides(items, "1/3") == ["b", "e"]
    assert shard_slides(items, "0/3") == ["a", "d", "g"]
    assert sorted(sum((shard_slides(items, f"{k}/3") for k in range(3)), [])) == items
    assert shard_slides(items, None) == items
    assert parse_shard(" 4 / 5 ") == (4, 5)
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)


def test_get_executor_errors():
    with pytest.raises(ConfigError, match="unknown executor 'dask'; valid choices: local, ray"):
        get_executor("dask")
    with pytest.raises(ConfigError, match=r"executor\.params\.workers"):
        get_executor("local", workers=0)
    with pytest.raises(ConfigError, match=r"executor\.params\.threads: unknown key"):
        get_executor("local", threads=2)


def test_ray_missing_gives_install_hint(monkeypatch):
    import sys

    from gigapath_core.executors.ray import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'gigapath-core\[ray\]'"):
        import_ray()


def test_ray_address_auto_without_a_cluster_is_a_config_error():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already connected in this process")
    with pytest.raises(ConfigError, match=r"executor\.params\.address: cannot join the Ray cluster at 'auto'"):
        get_executor("ray", address="auto")


def test_cli_address_implies_ray_and_rejects_other_executors(workdir):
    with pytest.raises(ConfigError, match="--address: joins a Ray cluster; it needs --executor ray"):
        run(config(workdir), out=str(workdir / "unused"), executor="local", address="auto")


def test_shard_runs_only_its_slice(workdir, reference):
    out = workdir / "out-shard"
    shutil.copytree(reference, out)  # shard 1/2 of [bad, s0, s1, s2] = [s0, s2]
    for sid in ("s0", "s2"):
        shutil.rmtree(out / sid)
    before = {p: p.stat().st_mtime_ns for p in out.glob("s1/*.h5")}
    assert run(config(workdir), out=str(out), shard="1/2") == 0
    import csv

    with open(out / "manifest-shard-1-of-2.csv", newline="") as f:
        rows = {r["slide_id"]: r["status"] for r in csv.DictReader(f)}
    assert rows == {"s0": "ok", "s2": "ok"}
    assert {p: p.stat().st_mtime_ns for p in out.glob("s1/*.h5")} == before
    assert_same_outputs(out, reference)


# ------------------------------------------------------------------------------- the shared contract
def test_local_reference_contract(reference):
    assert_contract(reference)


def assert_ray_on_loopback() -> None:
    """Every TCP port of this process and its children (the Ray cluster) listens on 127.0.0.1 only."""
    import re
    import subprocess

    psutil = pytest.importorskip("psutil")
    pids = {os.getpid()} | {c.pid for c in psutil.Process().children(recursive=True)}
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [ln.split()[3] for ln in listening.splitlines()
            if any(int(m) in pids for m in re.findall(r"pid=(\d+)", ln))]
    assert len(ours) >= 3, listening  # gcs, raylet, workers
    bad = [a for a in ours if not (a.startswith("127.0.0.1:") or a.startswith("[::ffff:127.0.0.1]:"))]
    assert not bad, f"Ray listens beyond loopback: {bad}"


def test_ray_num_gpus_limits_workers(ray_cluster):
    ex = get_executor("ray", num_gpus=1)  # the fixture cluster has 2 CPUs and 1 (fake) GPU
    try:
        assert ex._default_workers(n_slides=10) == 1
        assert get_executor("ray", num_gpus=0.5)._default_workers(10) == 2
        assert get_executor("ray")._default_workers(10) == 2
        assert get_executor("ray")._default_workers(1) == 1
    finally:
        ex.close()


def _kill_first_worker_seen(out: Path, killed: list, stop: threading.Event) -> None:
    """kill -9 the process holding the first slide lock that appears (a slide worker mid-slide)."""
    import json
    import socket

    while not stop.is_set():
        for lock in out.glob("s*/.gigapath.lock"):
            try:
                info = json.loads(lock.read_text())
            except (OSError, ValueError):
                continue
            if info.get("host") == socket.gethostname() and info["pid"] != os.getpid():
                os.kill(info["pid"], signal.SIGKILL)
                killed.append((lock.parent.name, info["pid"]))
                return
        time.sleep(0.005)


@pytest.mark.parametrize("executor", [{"name": "ray", "params": {"num_workers": 2}},
                                      {"name": "local", "params": {"workers": 2, "threads_per_worker": 1}}],
                         ids=["ray", "local-pool"])
def test_same_outputs_with_a_worker_killed_mid_slide(workdir, reference, executor, request):
    """The contract of every out-of-process executor, with one worker killed (-9) while it holds a slide:
    that slide is retried, the bad slide is recorded, and every output is byte-identical to the reference."""
    if executor["name"] == "ray":
        request.getfixturevalue("ray_cluster")
    out = workdir / f"out-killed-{request.node.callspec.id}"
    killed: list = []
    stop = threading.Event()
    t = threading.Thread(target=_kill_first_worker_seen, args=(out, killed, stop), daemon=True)
    t.start()
    try:
        code = run(config(workdir, **executor), out=str(out))
    finally:
        stop.set()
        t.join()
    assert killed, "no worker was caught mid-slide"
    assert code == 1  # only the bad slide failed
    assert_contract(out)
    assert_same_outputs(out, reference)
    assert read_status(out / killed[0][0])["status"] == "ok"
    if executor["name"] == "ray":
        assert_ray_on_loopback()
        # re-run: finished slides are skipped, nothing finished is rewritten, the bad slide fails again
        before = {p: p.stat().st_mtime_ns for p in out.glob("s*/*")}
        assert run(config(workdir, name="ray", params={"num_workers": 1}), out=str(out)) == 1
        rows = manifest(out)
        assert [rows[f"s{i}"]["this_run"] for i in range(N_GOOD)] == ["skipped"] * N_GOOD
        assert rows["bad"]["status"] == "failed"
        assert {p: p.stat().st_mtime_ns for p in out.glob("s*/*")} == before


def _kill_self_on_s1(config, slide):
    """A per-slide function whose slide "s1" kills its worker process every time (like an OOM kill)."""
    if slide.slide_id == "s1":
        os.kill(os.getpid(), signal.SIGKILL)
    return {"slide_id": slide.slide_id, "slide_path": slide.path, "status": "ok"}


@pytest.mark.parametrize("executor", [("ray", {"num_workers": 1, "max_restarts": 0, "max_task_retries": 0}),
                                      ("local", {"workers": 2, "threads_per_worker": 1, "max_retries": 1})],
                         ids=["ray", "local-pool"])
def test_a_slide_that_always_kills_its_worker_is_recorded_as_failed(tmp_path, executor, request):
    import sys
    from types import SimpleNamespace

    from gigapath_core.config import SlideInput

    name, params = executor
    if name == "ray":
        ray = request.getfixturevalue("ray_cluster")
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    slides = [SlideInput(slide_id=f"s{i}", path=f"/nowhere/s{i}.svs") for i in range(3)]
    ex = get_executor(name, **params)
    try:
        rows = {r["slide_id"]: r for r in ex.map(_kill_self_on_s1, SimpleNamespace(output=str(tmp_path)), slides)}
    finally:
        ex.close()
        if name == "ray":
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert sorted(rows) == ["s0", "s1", "s2"]
    assert rows["s0"]["status"] == rows["s2"]["status"] == "ok"  # the other slides are not blamed
    assert rows["s1"]["status"] == "failed" and rows["s1"]["error_type"] == "WorkerDied"
    assert read_status(tmp_path / "s1")["error_type"] == "WorkerDied"
