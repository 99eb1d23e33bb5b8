"""Distributed training: the shared Trainer under ``torchrun`` (2 processes, gloo, loopback only) against one
process with the same global batch: same gradients, same weights after each step, rank-0-only checkpoints and
log, and a resumed 2-process run that ends where the uninterrupted single-process run ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigapath_core.training import distributed as D

TORCHRUN = Path(sys.executable).with_name("torchrun")

# One script, run by `python` (1 process) and by `torchrun --nproc-per-node 2`. 8 micro-batches of 5 samples per
# epoch; grad_accum 4 -> 2 optimiser steps per epoch; under 2 ranks each takes 4 micro-batches, 2 per step.
WORKER = r'''
import json, sys
import torch
from safetensors.torch import save_file
from torch import nn
from gigapath_core.training import TrainConfig, Trainer
from gigapath_core.training import distributed as D

out, epochs = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

def batches(epoch):
    g = torch.Generator().manual_seed(100 + epoch)
    for _ in range(8):
        x = torch.randn(5, 6, generator=g)
        yield x, (x.sum(1, keepdim=True) ** 2) / 6

def step(m, batch):
    x, y = batch
    return {"loss": nn.functional.mse_loss(m(x), y)}

record = {}
def after_step(m, s):
    for k, v in m.state_dict().items():
        record[f"w{s}.{k}"] = v.detach().clone()

cfg = TrainConfig(lr=0.05, min_lr=0.05, weight_decay=0.01, epochs=epochs, grad_accum=4, seed=0, device="cpu",
                  progress=False, checkpoint_every=1, keep_checkpoints=5)
tr = Trainer(model, cfg, out, steps_per_epoch=8, after_step=after_step)
def pre_step(opt, args, kwargs):
    for i, p in enumerate(model.parameters()):
        record[f"g{tr.step + 1}.{i}"] = p.grad.detach().clone()
tr.optimizer.register_step_pre_hook(pre_step)
tr.fit(batches, step)
info = {"rank": D.get_rank(), "world": D.get_world_size(), "step": tr.step, "wrapped": type(tr.train_model).__name__,
        "stride": tr._stride, "accum": tr._accum}
save_file(record, f"{out}/record-rank{D.get_rank()}-epochs{epochs}.safetensors")
with open(f"{out}/info-rank{D.get_rank()}-epochs{epochs}.json", "w") as f:
    json.dump(info, f)
D.cleanup()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, out: Path, epochs: int, nproc: int) -> None:
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if nproc == 1:  # the single-process reference runs in this process
        import runpy

        argv = sys.argv
        sys.argv = [str(script), str(out), str(epochs)]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        return
    cmd = [str(TORCHRUN), f"--nproc-per-node={nproc}", "--nnodes=1", "--master-addr=127.0.0.1",
           f"--master-port={_free_port()}", str(script), str(out), str(epochs)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    script = d / "worker.py"
    script.write_text(WORKER)
    single, ddp = d / "single", d / "ddp"
    single.mkdir()
    ddp.mkdir()
    _launch(script, single, epochs=2, nproc=1)
    _launch(script, ddp, epochs=1, nproc=2)  # stops after epoch 0 (2 steps): an "interrupted" run
    snapshot = sorted(p.name for p in (ddp / "checkpoints").iterdir())
    _launch(script, ddp, epochs=2, nproc=2)  # resumes from the step-2 checkpoint
    return single, ddp, snapshot


def test_two_gloo_ranks_match_one_process_step_by_step(runs):
    single, ddp, _ = runs
    ref = _load(single / "record-rank0-epochs2.safetensors")
    for rank in (0, 1):
        info = json.loads((ddp / f"info-rank{rank}-epochs1.json").read_text())
        assert info == {"rank": rank, "world": 2, "step": 2, "wrapped": "DistributedDataParallel", "stride": 2,
                        "accum": 2}
        got = _load(ddp / f"record-rank{rank}-epochs1.safetensors")
        assert sorted(got) == sorted(k for k in ref if k[1] in "12")  # steps 1 and 2
        for k in got:  # gradients (averaged by DDP) and weights after each step
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    # and the gradients really differ between micro-batch shares (the comparison is not vacuous)
    assert not torch.allclose(ref["g1.0"], ref["g2.0"])


def test_resumed_ddp_run_ends_where_the_single_process_run_ends(runs):
    single, ddp, _ = runs
    ref = _load(single / "record-rank0-epochs2.safetensors")
    for rank in (0, 1):
        info = json.loads((ddp / f"info-rank{rank}-epochs2.json").read_text())
        assert info["step"] == 4
        got = _load(ddp / f"record-rank{rank}-epochs2.safetensors")
        assert sorted(got) == sorted(k for k in ref if k[1] in "34")  # only steps 3 and 4 were run again
        for k in got:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def test_only_rank_0_writes_checkpoints_and_log(runs):
    single, ddp, snapshot = runs
    assert snapshot == ["step_00000001", "step_00000002"]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == [f"step_0000000{i}" for i in range(1, 5)]
    log = [json.loads(line) for line in (ddp / "train_log.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (single / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # one line per step, not one per rank
    # the logged loss is the mean over ranks = the single process's mean over the same 4 micro-batches
    for a, b in zip(log, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_single_process_helpers_are_no_ops():
    assert not D.is_initialized() and D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    assert D.rank_share(list(range(7))) == list(range(7))
    assert D.distributed_sampler(list(range(4))) is None
    assert D.all_reduce_mean(2.5) == 2.5
    assert D.init_distributed() is False  # no torchrun environment


# ------------------------------------------------------------------------------- a fine-tuning config
def _finetune_inputs(d: Path) -> Path:
    """8 slides of random 16-d tile embeddings (6-13 tiles), one per patient, binary labels; a finetune config
    (ABMIL without dropout, so no random numbers are drawn per micro-batch) with 4 slides per optimiser step."""
    import csv

    import numpy as np
    import yaml

    from gigapath_core.store import write_h5

    rng = np.random.default_rng(0)
    emb = d / "embeddings"
    rows = []
    for i in range(8):
        n = 6 + i
        grid = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)
        write_h5(emb / f"slide{i}" / "tile_embeddings.h5",  # format_version 2: level-0 coords (0.25 µm/px) + grid
                 {"features": rng.normal(size=(n, 16)).astype(np.float32) + (i % 2),
                  "coords": grid * 2, "grid_coords": grid},
                 {"tile_encoder": "synthetic", "weights_source": "random"})
        rows.append({"slide_id": f"slide{i}", "patient_id": f"p{i}", "y": "pos" if i % 2 else "neg"})
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide_id", "patient_id", "y"])
        w.writeheader()
        w.writerows(rows)
    cfg = {"job": "finetune",
           "data": {"embeddings": [str(emb)], "labels": str(d / "labels.csv"), "label_columns": ["y"],
                    "task": "binary", "classes": ["neg", "pos"], "slides_per_patient": "all"},
           "folds": {"k": 2, "seed": 0},
           "model": {"slide_encoder": None, "head": {"name": "abmil", "params": {"attn_dim": 8, "dropout": 0.0}}},
           "train": {"lr": 1.0e-2, "epochs": 1, "max_steps": 1, "grad_accum": 4, "warmup_epochs": 0, "seed": 0,
                     "device": "cpu", "progress": False},
           "plots": False, "cpu_threads": 1}
    (d / "finetune.yaml").write_text(yaml.safe_dump(cfg))
    return d / "finetune.yaml"


def test_finetune_config_under_torchrun_matches_one_process(tmp_path):
    cfg = _finetune_inputs(tmp_path)
    gigapath = Path(sys.executable).with_name("gigapath")
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    from gigapath_core.jobs import run

    threads = torch.get_num_threads()
    try:  # the single-process reference, in this process
        assert run(str(cfg), out=str(tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(threads)
    ddp = subprocess.run([str(TORCHRUN), "--nproc-per-node=2", "--nnodes=1", "--master-addr=127.0.0.1",
                          f"--master-port={_free_port()}", "--no-python", str(gigapath), "run", str(cfg),
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "rank 0 of 2" in ddp.stderr  # the Trainer started the process group (and so strides micro-batches)
    for fold in (0, 1):
        a = _load(tmp_path / "single" / f"fold_{fold}" / "checkpoints" / "step_00000001" / "model.safetensors")
        b = _load(tmp_path / "ddp" / f"fold_{fold}" / "checkpoints" / "step_00000001" / "model.safetensors")
        assert sorted(a) == sorted(b) and len(a) > 0
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"fold {fold} {k}")
        log = (tmp_path / "ddp" / f"fold_{fold}" / "train_log.jsonl").read_text().splitlines()
        assert len(log) == 1  # rank 0 only
