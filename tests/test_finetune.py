"""The finetune job: metrics recomputed from saved predictions, patient-grouped folds, resume, config errors,
layer-wise lr decay, and the stain example end to end (reduced)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gigapath_core as gp
from gigapath_core.errors import ConfigError
from gigapath_core.stages.tile_embedding import write_tile_embeddings

ROOT = Path(__file__).resolve().parent.parent


def make_cohort(root: Path, n_patients: int = 16, task: str = "binary", dim: int = 8, shift: float = 3.0,
                seed: int = 0, noise_only: bool = False, folder: str = "emb") -> Path:
    """Synthetic tile embeddings + labels.csv. Patient p has 1 + p % 3 slides of 4-12 tiles; the label of a
    patient (class p % C, or label j = bit j of p for multilabel) shifts feature dimension c of a third of its tiles."""
    rng = np.random.default_rng(seed)
    n_classes = {"binary": 2, "multiclass": 3, "multilabel": 2}[task]
    rows = []
    for p in range(n_patients):
        target = [(p >> j) & 1 for j in range(n_classes)] if task == "multilabel" else p % n_classes
        for s in range(1 + p % 3):
            sid = f"P{p:02d}-S{s}"
            n = int(rng.integers(4, 13))
            feats = rng.normal(size=(n, dim)).astype(np.float32)
            if not noise_only:
                hot = rng.random(n) < 1 / 3
                hot[0] = True
                for c in ([j for j in range(n_classes) if target[j]] if task == "multilabel" else [target]):
                    feats[hot, c] += shift
            coords = np.stack([np.arange(n) % 4 * 256, np.arange(n) // 4 * 256], 1)
            write_tile_embeddings(root / folder / sid / "tile_embeddings.h5", feats, coords * 2, coords,
                                  {"tile_encoder": "synthetic", "weights_source": "random"})
            row = {"slide_id": sid, "patient_id": f"P{p:02d}"}
            if task == "multilabel":
                row.update({f"gene{j}": target[j] for j in range(n_classes)})
            else:
                row["label"] = ["neg", "pos"][target] if task == "binary" else f"c{target}"
            rows.append(row)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def config(root: Path, **over) -> dict:
    cfg = {"job": "finetune",
           "data": {"embeddings": str(root / "emb"), "labels": str(root / "labels.csv"), "label_columns": "label",
                    "task": "binary", "slides_per_patient": "all"},
           "folds": {"k": 4, "seed": 0},
           "model": {"head": {"name": "abmil", "params": {"attn_dim": 8, "dropout": 0.0}}},
           "train": {"epochs": 5, "grad_accum": 2, "lr": 0.02, "device": "cpu", "progress": False},
           "output": str(root / "out")}
    for k, v in over.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_json_equals_sklearn_on_saved_predictions(tmp_path):
    from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score

    make_cohort(tmp_path)
    assert gp.run(config(tmp_path, **{"folds.val_fraction": 0.25})) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    preds = read_csv(out / "predictions.csv")
    per_fold = []
    for f in range(4):
        rows = [r for r in preds if r["fold"] == str(f) and r["split"] == "test"]
        y = np.array([int(r["label"]) for r in rows])
        p = np.array([float(r["prob_pos"]) for r in rows])
        per_fold.append({"auroc": roc_auc_score(y, p), "auprc": average_precision_score(y, p),
                         "bacc": balanced_accuracy_score(y, (p >= 0.5).astype(int))})
        assert read_csv(out / f"fold_{f}" / "predictions.csv") == [r for r in preds if r["fold"] == str(f)]
    for name in ("auroc", "auprc", "bacc"):
        vals = [d[name] for d in per_fold]
        assert metrics["summary"][name]["folds"] == pytest.approx(vals, abs=1e-12)
        assert metrics["summary"][name]["mean"] == pytest.approx(np.mean(vals))
        assert metrics["summary"][name]["sem"] == pytest.approx(np.std(vals, ddof=1) / math.sqrt(4))
    assert metrics["summary"]["auroc"]["mean"] > 0.8  # the signal is strong; the head must learn it
    assert any("RANDOM" in n for n in metrics["notes"])
    for name in ("results.md", "results.csv", "roc.png", "pr.png", "splits.csv", "config.yaml"):
        assert (out / name).is_file(), name
    # the held-out patients of each fold were not trained on
    splits = read_csv(out / "splits.csv")
    for f in range(4):
        train_patients = {r["patient_id"] for r in splits if r["fold"] == str(f) and r["split"] != "test"}
        test_patients = {r["patient_id"] for r in preds if r["fold"] == str(f) and r["split"] == "test"}
        assert test_patients and not train_patients & test_patients


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_multiclass_and_multilabel(tmp_path, task):
    from sklearn.metrics import roc_auc_score

    make_cohort(tmp_path, n_patients=18, task=task)
    over = {"data.task": task, "folds.k": 3, "train.epochs": 3}
    if task == "multilabel":
        over["data.label_columns"] = ["gene0", "gene1"]
    gp.run(config(tmp_path, **over))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    preds = [r for r in read_csv(tmp_path / "out" / "predictions.csv") if r["fold"] == "0" and r["split"] == "test"]
    if task == "multiclass":
        p = np.array([[float(r[f"prob_c{c}"]) for c in range(3)] for r in preds])
        y = np.array([int(r["label"]) for r in preds])
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
        expected = roc_auc_score(y, p, multi_class="ovr")
        assert set(metrics["summary"]) >= {"auroc/c0", "auroc/c1", "auroc/c2", "auprc/c0"}
    else:
        y = np.array([[int(r["y_gene0"]), int(r["y_gene1"])] for r in preds])
        p = np.array([[float(r["prob_gene0"]), float(r["prob_gene1"])] for r in preds])
        expected = roc_auc_score(y, p, average="macro")
        assert set(metrics["summary"]) >= {"auroc/gene0", "auroc/gene1", "bacc/gene1"}
    assert metrics["folds"][0]["test"]["auroc"] == pytest.approx(expected)


def test_largest_slide_per_patient(tmp_path):
    from gigapath_core.finetune.config import DataConfig
    from gigapath_core.finetune.data import load_data

    make_cohort(tmp_path)
    data = load_data(DataConfig(embeddings=[str(tmp_path / "emb")], labels=str(tmp_path / "labels.csv"),
                                label_columns=["label"], task="binary", slides_per_patient="largest"))
    import h5py

    sizes = {}
    for p in sorted((tmp_path / "emb").iterdir()):
        with h5py.File(p / "tile_embeddings.h5") as f:
            sizes[p.name] = f["features"].shape[0]
    for pid in {s.split("-")[0] for s in sizes}:
        mine = {s: n for s, n in sizes.items() if s.startswith(pid)}
        best = max(sorted(mine), key=lambda s: mine[s])  # most tiles; ties -> first slide id
        assert best in data.slides
        assert all(s in data.excluded for s in mine if s != best)
    assert len(data.slides) == 16 and data.tile_dim == 8


def test_rerun_reuses_folds_and_resumes_an_unfinished_one(tmp_path):
    make_cohort(tmp_path)
    cfg = config(tmp_path)
    gp.run(cfg)
    out = tmp_path / "out"
    before = (out / "predictions.csv").read_text()
    logs = {f: (out / f"fold_{f}" / "train_log.jsonl").read_text() for f in range(4)}
    # fold 1 "crashed" after training but before its predictions were written
    (out / "fold_1" / "status.json").unlink()
    (out / "fold_1" / "predictions.csv").unlink()
    gp.run(cfg)
    assert (out / "predictions.csv").read_text() == before
    assert {f: (out / f"fold_{f}" / "train_log.jsonl").read_text() for f in range(4)} == logs  # nothing retrained
    ckpt = next((out / "fold_0" / "checkpoints").glob("step_*"))
    assert (ckpt / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="output: .*fold_0 holds a run with a different config"):
        gp.run(config(tmp_path, **{"train.lr": 0.05}))


@pytest.mark.parametrize("over, message", [
    ({"train.lrr": 0.1}, "train.lrr: unknown key"),
    ({"data.task": "regression"}, "data.task: Input should be"),
    ({"data.labels": "nope.csv"}, "data.labels: labels CSV not found"),
    ({"data.label_columns": "grade"}, "data.label_columns: .* has no column 'grade'"),
    ({"model.head.name": "nope"}, "model.head.name: unknown plugin or preset 'nope'"),
    ({"model.head.params": {"num_classes": 3}}, "model.head.params.num_classes: 3 does not match"),
    ({"model.head": {"name": "linear"}}, "model: the model cannot run .*slide embedding"),
    ({"folds.k": 40}, "folds.k: 40 folds need at least 40 patients"),
    ({"data.classes": ["neg", "maybe"]}, "data.classes: labels \\['pos'\\]"),
])
def test_config_errors(tmp_path, over, message):
    make_cohort(tmp_path, n_patients=6)
    cfg = config(tmp_path, **over)
    if "data.labels" in over:
        cfg["data"]["labels"] = str(tmp_path / "nope.csv")
    with pytest.raises(ConfigError, match=message):
        gp.run(cfg)


def _tiny_layered_encoder():
    from gigapath_core.kinds import SlideEncoder

    class Tiny(SlideEncoder):
        name = "tiny_layered_test"

        def __init__(self):
            super().__init__()
            self.in_dim = self.embed_dim = 4
            self.proj = nn.Linear(4, 4)
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.norm = nn.LayerNorm(4)
            self.drop = nn.Dropout(0.5)

        def forward(self, tile_embeds, coords, padding_mask=None, return_tile_tokens=False):
            x = self.proj(tile_embeds)
            for layer in self.encoder.layers:
                x = self.drop(layer(x))
            x = self.norm(x)
            return (x.mean(1), x) if return_tile_tokens else x.mean(1)

    return Tiny()


def test_layerwise_lr_decay_from_the_top():
    from gigapath_core.finetune.model import SlideClassifier, layer_ids
    from gigapath_core.training import layerwise_param_groups

    head = gp.build("task_head", "abmil", in_dim=4, num_classes=1)
    model = SlideClassifier(_tiny_layered_encoder(), head)
    layer_id, num = layer_ids(model)
    groups = layerwise_param_groups(model, lr=1.0, weight_decay=0.01, layer_decay=0.9, layer_id=layer_id,
                                    num_layers=num)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 3 layers: head and final norm x1, top layer (2) x0.9, layer 0 x0.9^3, input projection x0.9^4
    assert lr_of[id(named["head.classifier.weight"])] == pytest.approx(1.0)
    assert lr_of[id(named["slide_encoder.norm.weight"])] == pytest.approx(1.0)
    assert lr_of[id(named["slide_encoder.encoder.layers.2.weight"])] == pytest.approx(0.9)
    assert lr_of[id(named["slide_encoder.encoder.layers.0.weight"])] == pytest.approx(0.9 ** 3)
    assert lr_of[id(named["slide_encoder.proj.weight"])] == pytest.approx(0.9 ** 4)


def test_frozen_slide_encoder_stays_fixed_and_in_eval_mode():
    from gigapath_core.finetune.model import SlideClassifier

    torch.manual_seed(0)
    enc = _tiny_layered_encoder()
    head = gp.build("task_head", "abmil", in_dim=4, num_classes=1, dropout=0.0)
    model = SlideClassifier(enc, head, freeze_encoder=True)
    model.train()
    assert not enc.training and model.head.training
    assert all(not p.requires_grad for p in enc.parameters())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(1, 6, 4)
    for _ in range(3):
        model(x, torch.zeros(1, 6, 2)).sum().backward()
        opt.step()
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    a = model(x, torch.zeros(1, 6, 2))  # train mode, but the frozen encoder's dropout (p=0.5) is off
    torch.testing.assert_close(model(x, torch.zeros(1, 6, 2)), a)


def _load_example_module():
    path = ROOT / "examples" / "stain_task" / "make_pseudo_slides.py"
    spec = importlib.util.spec_from_file_location("make_pseudo_slides", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stain_example_end_to_end_reduced(tmp_path, shared_data):
    """examples/stain_task with a 1-layer ViT, two slides (H&E SVS, Ki67 OME-TIFF), 3 folds, 3 epochs."""
    slides = shared_data / "slides"
    embed = gp.run(ROOT / "examples" / "stain_task" / "embed.yaml", out=str(tmp_path / "embed"), sets=[
        f"inputs.slides=[{slides / 'CMU-1-Small-Region.svs'}, {slides / 'OS-2-ndpi.ome.tif'}]",
        "tile_encoder.name=dinov2_vit",
        "tile_encoder.params={model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}, img_size: 28, resize: 32}",
        "device=cpu"])
    assert embed == 0
    rows = _load_example_module().cut_pseudo_slides(tmp_path / "embed", tmp_path / "pseudo")
    stains = {r["stain"] for r in rows}
    assert stains == {"HE", "IHC"} and all(r["n_tiles"] >= 2 for r in rows)
    gp.run(ROOT / "examples" / "stain_task" / "finetune.yaml", out=str(tmp_path / "ft"), sets=[
        f"data.embeddings={tmp_path / 'pseudo'}", f"data.labels={tmp_path / 'pseudo' / 'labels.csv'}",
        "folds.k=3", "train.epochs=3", "train.device=cpu", "train.progress=false"])
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    auroc = metrics["summary"]["auroc"]
    assert len(auroc["folds"]) == 3 and math.isfinite(auroc["mean"]) and math.isfinite(auroc["sem"])
    assert metrics["models"]["tile_encoder_weights"] == ["random"]
    assert any("RANDOM" in n for n in metrics["notes"])
    assert (tmp_path / "ft" / "roc.png").stat().st_size > 1000


def test_longnet_drops_in_with_layerwise_decay(tmp_path):
    """The LongNet plugin (parameter names encoder.layers.{i}.…, Xu et al. 2024, Methods: slide encoder (LongNet))
    fine-tuned under the ABMIL head."""
    from gigapath_core.finetune.config import load_finetune_config
    from gigapath_core.finetune.data import load_data
    from gigapath_core.finetune.model import layer_ids
    from gigapath_core.finetune.runner import build_model

    if "longnet" not in {p["name"] for p in gp.list_plugins("slide_encoder")}:
        pytest.skip("the longnet slide encoder plugin is not installed")
    make_cohort(tmp_path, n_patients=8)
    se = {"name": "longnet", "params": {"depth": 2, "embed_dim": 32, "num_heads": 2}, "weights": "random"}
    cfg = config(tmp_path, **{"model.slide_encoder": se, "folds.k": 2, "train.epochs": 1})
    c = load_finetune_config(cfg, tmp_path)
    model = build_model(c, load_data(c.data))
    assert model.slide_encoder.in_dim == 8 and model.head.in_dim == 32  # filled in from the data
    layer_id, num = layer_ids(model)
    assert num == 3
    assert layer_id("slide_encoder.cls_token") == layer_id("slide_encoder.patch_embed.proj.weight") == 0
    assert layer_id("slide_encoder.encoder.layers.1.ffn.fc1.weight") == 2
    assert layer_id("slide_encoder.norm.weight") == layer_id("head.classifier.weight") == 3
    gp.run(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["models"]["slide_encoder"] == "longnet" and not metrics["models"]["slide_encoder_frozen"]
    assert metrics["models"]["trainable_parameters"] > metrics["models"]["slide_encoder_parameters"]
