"""Distributed training: the shared Trainer under ``torchrun`` (2 processes, gloo, loopback only) against one
process with the same global batch: same gradients, same weights after each step (with dropout: the masks are
keyed to the global micro-batch), rank-0-only checkpoints and log, a resumed 2-process run that ends where the
uninterrupted single-process run ends, and a LongNet + ABMIL fine-tune with dropout and drop-path that gives the
same weights and predictions on 2 ranks as on one process."""

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
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))  # masks keyed per micro-batch

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
DROPOUT = {"model.slide_encoder.params.dropout": 0.3, "model.slide_encoder.params.drop_path_rate": 0.5,
           "model.head.params.dropout": 0.3}


#: parameters that cannot change any output, so their exact gradient is 0: the attention-logit bias of ABMIL
#: (softmax is shift-invariant). AdamW scales the round-off left in their gradient (~1e-9, summed in a different
#: order on 2 ranks) to steps of ~lr, so their values are noise in every run and are not compared.
NO_EFFECT = {"head.pool.w.bias"}


def _finetune_inputs(d: Path) -> Path:
    """8 slides of random 16-d tile embeddings (10-17 tiles on a 4-wide grid), one per patient, binary labels;
    a finetune config: a tiny random LongNet (2 layers, two dilated branches) + ABMIL with dropout 0.3 everywhere
    and drop-path up to 0.5, random 8-tile subsets (``max_tiles``), 2 folds of 4 training slides, 4 slides per
    optimiser step, 2 epochs (2 steps per fold)."""
    import csv

    import numpy as np
    import yaml

    from gigapath_core.stages.tile_embedding import write_tile_embeddings

    rng = np.random.default_rng(0)
    emb = d / "embeddings"
    rows = []
    for i in range(8):
        n = 10 + i
        grid = np.stack([np.arange(n) % 4 * 256, np.arange(n) // 4 * 256], 1)
        write_tile_embeddings(emb / f"slide{i}" / "tile_embeddings.h5",
                              rng.normal(size=(n, 16)).astype(np.float32) + (i % 2), grid * 2, grid,
                              {"tile_encoder": "synthetic", "weights_source": "random"})
        rows.append({"slide_id": f"slide{i}", "patient_id": f"p{i}", "y": "pos" if i % 2 else "neg"})
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide_id", "patient_id", "y"])
        w.writeheader()
        w.writerows(rows)
    longnet = {"name": "longnet", "weights": "random",
               "params": {"depth": 2, "embed_dim": 16, "num_heads": 2, "segment_lengths": [4, 8],
                          "dilated_ratios": [1, 2], "dropout": DROPOUT["model.slide_encoder.params.dropout"],
                          "drop_path_rate": DROPOUT["model.slide_encoder.params.drop_path_rate"],
                          "attention_backend": "math"}}
    cfg = {"job": "finetune",
           "data": {"embeddings": [str(emb)], "labels": str(d / "labels.csv"), "label_columns": ["y"],
                    "task": "binary", "classes": ["neg", "pos"], "slides_per_patient": "all", "max_tiles": 8},
           "folds": {"k": 2, "seed": 0},
           "model": {"slide_encoder": longnet,
                     "head": {"name": "abmil", "params": {"attn_dim": 8,
                                                          "dropout": DROPOUT["model.head.params.dropout"]}}},
           "train": {"lr": 2.0e-2, "epochs": 2, "grad_accum": 4, "warmup_epochs": 0, "seed": 0, "device": "cpu",
                     "progress": False},
           "plots": False, "cpu_threads": 1}
    (d / "finetune.yaml").write_text(yaml.safe_dump(cfg))
    return d / "finetune.yaml"


def _weights(out: Path, fold: int) -> dict[str, torch.Tensor]:
    return _load(out / f"fold_{fold}" / "checkpoints" / "step_00000002" / "model.safetensors")


def _probs(out: Path) -> dict[tuple[str, str, str], float]:
    import csv

    with open(out / "predictions.csv", newline="") as f:
        return {(r["fold"], r["split"], r["slide_id"]): float(r["prob_pos"]) for r in csv.DictReader(f)}


def test_longnet_finetune_with_dropout_under_torchrun_matches_one_process(tmp_path):
    """Dropout, drop-path and the max_tiles subsets are keyed to the global micro-batch, so 2 ranks (each
    training on every other slide) draw what one process draws: same weights, same predictions."""
    cfg = _finetune_inputs(tmp_path)
    gigapath = Path(sys.executable).with_name("gigapath")
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    from gigapath_core.jobs import run

    threads = torch.get_num_threads()
    try:  # the single-process reference and the same run without dropout, in this process
        assert run(str(cfg), out=str(tmp_path / "single")) == 0
        assert run(str(cfg), out=str(tmp_path / "no_dropout"), sets=[f"{k}=0" for k in DROPOUT]) == 0
    finally:
        torch.set_num_threads(threads)
    ddp = subprocess.run([str(TORCHRUN), "--nproc-per-node=2", "--nnodes=1", "--master-addr=127.0.0.1",
                          f"--master-port={_free_port()}", "--no-python", str(gigapath), "run", str(cfg),
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "rank 0 of 2" in ddp.stderr  # the Trainer started the process group (and so strides micro-batches)
    single, no_dropout, dist = tmp_path / "single", tmp_path / "no_dropout", tmp_path / "ddp"
    for fold in (0, 1):
        a, b, c = _weights(single, fold), _weights(dist, fold), _weights(no_dropout, fold)
        assert sorted(a) == sorted(b) and any(k.startswith("slide_encoder.encoder.layers.1.") for k in a)
        diff = max(float((b[k] - a[k]).abs().max()) for k in a if k not in NO_EFFECT)
        assert diff < 1e-5, f"fold {fold}: 2 ranks vs 1 process, max abs weight difference {diff}"
        # dropout/drop-path really changed training (so the comparison above can fail)
        assert max(float((c[k] - a[k]).abs().max()) for k in a) > 1e-3
        log = (dist / f"fold_{fold}" / "train_log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == [1, 2]  # rank 0 only, 2 steps
    p1, p2 = _probs(single), _probs(dist)
    assert sorted(p1) == sorted(p2) and len(p1) == 8  # every slide is a test slide of one fold
    assert max(abs(p1[k] - p2[k]) for k in p1) < 1e-5
    assert max(abs(p1[k] - v) for k, v in _probs(no_dropout).items()) > 1e-4
