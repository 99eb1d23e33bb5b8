"""Exemplar selection (``gigapath reports exemplars``) on the shipped synthetic corpus
(examples/data/report_corpus.csv: 48 reports in surgical-pathology style, 12 each of colon, breast, skin and
prostate, with invented names, numbers and boilerplate), embedded with the offline MiniLM text encoder."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml

from gigapath_core.cli import main
from gigapath_core.errors import ConfigError
from gigapath_core.reports.exemplars import embed_reports, read_reports, select_exemplars
from gigapath_core.reports.prompt import load_exemplars

CORPUS = Path(__file__).resolve().parent.parent / "examples" / "data" / "report_corpus.csv"


@pytest.fixture(scope="module")
def corpus():
    rows, texts = read_reports(CORPUS)
    return rows, texts, embed_reports(texts, "minilm-l6")


def test_one_exemplar_per_cluster_nearest_its_centre(corpus):
    rows, texts, emb = corpus
    assert emb.shape == (48, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    sel = select_exemplars(emb, k=4, seed=0)
    assert sel.labels[sel.indices].tolist() == [0, 1, 2, 3]  # each exemplar is in its own cluster
    assert sel.indices.tolist() == sorted(sel.indices.tolist())  # clusters numbered by exemplar row
    assert sel.sizes.sum() == 48 and sel.sizes.tolist() == np.bincount(sel.labels).tolist()
    for c, i in enumerate(sel.indices):
        members = np.flatnonzero(sel.labels == c)
        d = np.linalg.norm(emb[members] - sel.centres[c], axis=1)
        assert members[np.argmin(d)] == i and np.isclose(d.min(), sel.distances[c])
    # MiniLM separates the four diagnoses of this corpus: pure clusters, one exemplar per diagnosis
    for c in range(4):
        assert len({rows[j]["diagnosis"] for j in np.flatnonzero(sel.labels == c)}) == 1
    assert sorted(rows[i]["diagnosis"] for i in sel.indices) == [
        "breast carcinoma", "colon adenocarcinoma", "prostate adenocarcinoma", "skin lesion"]


def test_clustering_is_seeded(corpus):
    _, _, emb = corpus
    a, b = select_exemplars(emb, k=3, seed=7), select_exemplars(emb, k=3, seed=7)
    assert a.labels.tolist() == b.labels.tolist() and a.indices.tolist() == b.indices.tolist()
    assert np.array_equal(a.centres, b.centres)
    with pytest.raises(ConfigError, match="at least k distinct reports"):
        select_exemplars(emb[:3], k=4)


def test_cli_writes_the_hand_cleaning_file(corpus, tmp_path):
    rows, texts, emb = corpus
    rows, texts, emb = rows[:16], texts[:16], emb[:16]  # 4 reports of each diagnosis: a faster embedding
    subset = tmp_path / "reports.csv"
    with open(subset, "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "exemplars.yaml"
    assert main(["reports", "exemplars", str(subset), "--k", "4", "--text-encoder", "minilm-l6", "--out",
                 str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    sel = select_exemplars(emb, 4, 0)
    assert (doc["k"], doc["seed"], doc["n_reports"], doc["text_encoder"]) == (4, 0, 16, "minilm-l6")
    assert [e["row"] for e in doc["exemplars"]] == sel.indices.tolist()
    assert [e["cluster_size"] for e in doc["exemplars"]] == sel.sizes.tolist()
    assert [e["raw"] for e in doc["exemplars"]] == [texts[i] for i in sel.indices]
    assert [e["columns"]["report_id"] for e in doc["exemplars"]] == [rows[i]["report_id"] for i in sel.indices]
    assert sorted(e["columns"]["diagnosis"] for e in doc["exemplars"]) == [
        "breast carcinoma", "colon adenocarcinoma", "prostate adenocarcinoma", "skin lesion"]
    assert "raw: |" in out.read_text()  # multi-line reports as YAML block text, easy to edit by hand
    with pytest.raises(ConfigError, match=r"exemplar\(s\) 1, 2, 3, 4 have an empty 'cleaned:'"):
        load_exemplars(out)
    for i, e in enumerate(doc["exemplars"]):
        e["cleaned"] = f"cleaned {i}"
    out.write_text(yaml.safe_dump(doc))
    assert [e.cleaned for e in load_exemplars(out)] == ["cleaned 0", "cleaned 1", "cleaned 2", "cleaned 3"]


def test_shipped_exemplars_are_the_ones_the_command_chooses(corpus):
    """examples/report_exemplars.yaml (used by examples/clean_reports.yaml) = the command's output for the shipped
    corpus, with every `cleaned:` written by hand and free of the header's identifiers."""
    rows, texts, emb = corpus
    doc = yaml.safe_load((CORPUS.parent.parent / "report_exemplars.yaml").read_text())
    sel = select_exemplars(emb, doc["k"], doc["seed"])
    assert [e["row"] for e in doc["exemplars"]] == sel.indices.tolist()
    assert [e["raw"] for e in doc["exemplars"]] == [texts[i] for i in sel.indices]
    for ex in load_exemplars(CORPUS.parent.parent / "report_exemplars.yaml"):
        assert ex.cleaned and not any(w in ex.cleaned for w in ("Patient", "MRN", "Dr.", "MD", "Page", "signed"))
