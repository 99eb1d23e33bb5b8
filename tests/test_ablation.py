"""The ablation job: variants on shared folds, one side-by-side table with one-sided Wilcoxon p-values."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

import gigapath_core as gp
from gigapath_core.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_finetune import config, make_cohort  # noqa: E402


def _ablation(root: Path, **over) -> dict:
    base = config(root)
    base["folds"] = {"k": 5, "seed": 1}
    base["model"] = {"slide_encoder": {"name": "mean", "freeze": True}, "head": {"name": "linear"}}
    base["train"].update(epochs=6, lr=0.05)
    del base["output"]
    cfg = {"job": "ablation", "base": base, "output": str(root / "abl"), "reference": "informative",
           "metrics": ["auroc", "bacc"],
           "variants": {"informative": {}, "noise": {"data.embeddings": str(root / "noise")},
                        "abmil": {"model.slide_encoder": None, "model.head": {"name": "abmil"}}}}
    cfg.update(over)
    return cfg


def test_ablation_table_with_wilcoxon_p_values(tmp_path):
    make_cohort(tmp_path, n_patients=20, shift=4.0)
    make_cohort(tmp_path / "n", n_patients=20, noise_only=True, seed=5)  # same slide ids, no signal
    (tmp_path / "n" / "emb").rename(tmp_path / "noise")
    assert gp.run(_ablation(tmp_path)) == 0
    out = tmp_path / "abl"
    result = json.loads((out / "ablation.json").read_text())
    good, noise = result["variants"]["informative"]["auroc"], result["variants"]["noise"]["auroc"]
    diffs = [a - b for a, b in zip(good["folds"], noise["folds"])]
    assert len(diffs) == 5 and all(d > 0 for d in diffs)
    # all 5 paired differences positive: exact one-sided Wilcoxon p = 1 / 2^5
    assert result["tests"]["noise"]["auroc"]["p"] == pytest.approx(1 / 32)
    with open(out / "ablation.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["informative", "noise", "abmil"]
    assert rows["informative"]["p auroc"] == "ref" and rows["noise"]["p auroc"] == "0.0312"
    assert rows["noise"]["auroc"].startswith(f"{noise['mean']:.3f} ± ")
    assert "| noise |" in (out / "ablation.md").read_text()
    # every variant ran on the same folds
    shared = (out / "splits.csv").read_text()
    for v in ("informative", "noise", "abmil"):
        assert (out / v / "splits.csv").read_text() == shared
        assert (out / v / "metrics.json").is_file()


def test_variants_are_validated_before_anything_runs(tmp_path):
    make_cohort(tmp_path, n_patients=6)
    with pytest.raises(ConfigError, match="variants.noise: data.embeddings\\[0\\]: embeddings folder not found"):
        gp.run(_ablation(tmp_path))
    assert not (tmp_path / "abl" / "informative").exists()
    with pytest.raises(ConfigError, match="reference: unknown variant 'best'"):
        gp.run(_ablation(tmp_path, reference="best"))
    with pytest.raises(ConfigError, match="variants.x.folds.k: variants share the folds"):
        gp.run(_ablation(tmp_path, reference="a", variants={"a": {}, "x": {"folds.k": 3}}))
    with pytest.raises(ConfigError, match="variants.x: train.lrr: unknown key"):
        gp.run(_ablation(tmp_path, reference="a", variants={"a": {}, "x": {"train.lrr": 3}}))
    with pytest.raises(ConfigError, match="variants: .*at least 2"):
        gp.run(_ablation(tmp_path, variants={"a": {}}))
