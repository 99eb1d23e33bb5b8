"""Zero-shot classification with the MI-Zero prompt protocol (gigapath_core.zeroshot).

Toy set: text "embeddings" are fixed unit vectors chosen per class-name word, so the correct answers and
metrics are known by hand; metrics are cross-checked against their textbook definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gigapath_core.zeroshot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    class_probabilities,
    classification_metrics,
    mutation_classes,
    sample_prompt_sets,
    zero_shot,
)

CLASSES = {
    "LUAD": ["lung adenocarcinoma", "adenocarcinoma of the lung"],
    "LUSC": ["lung squamous cell carcinoma", "squamous cell carcinoma of the lung"],
}


def fake_text_encoder(texts: list[str]) -> torch.Tensor:
    """Prompts mentioning 'adeno' -> e0, 'squamous' -> e1, plus a small template-dependent component e2."""
    out = []
    for t in texts:
        v = torch.zeros(3)
        v[0 if "adeno" in t else 1] = 1.0
        v[2] = 0.1 * (len(t) % 3)
        out.append(v)
    return torch.stack(out)


def test_prompt_sets_follow_the_protocol():
    sets = sample_prompt_sets(CLASSES, DEFAULT_TEMPLATES, n_sets=50, seed=3)
    assert len(sets) == 50
    sizes = set()
    for s in sets:
        assert list(s) == ["LUAD", "LUSC"]
        k = len(s["LUAD"])
        assert k == len(s["LUSC"]) and 1 <= k <= len(DEFAULT_TEMPLATES)
        sizes.add(k)
        for label, prompts in s.items():
            assert len(set(prompts)) == k  # templates drawn without replacement
            names = [n for n in CLASSES[label] if all(n in p for p in prompts)]
            assert names, (label, prompts)  # one class name shared by all of the class's prompts
    assert len(sizes) > 5  # subset sizes vary across sets
    assert sets == sample_prompt_sets(CLASSES, DEFAULT_TEMPLATES, n_sets=50, seed=3)  # seeded
    with pytest.raises(ValueError, match="placeholder"):
        sample_prompt_sets(CLASSES, ["no slot"], 2)


def test_mutation_prompts():
    c = mutation_classes("EGFR", "lung adenocarcinoma")
    assert list(c) == ["mutated", "wild-type"]
    assert c["mutated"][0] == "EGFR mutated lung adenocarcinoma"
    assert c["wild-type"][0] == "EGFR wild-type lung adenocarcinoma"
    assert all(n.startswith("EGFR") for names in c.values() for n in names)


def test_class_embeddings_are_normalised_prompt_means():
    ps = {"A": ["x adeno", "yy adeno"], "B": ["squamous"]}
    emb = class_embeddings(fake_text_encoder, ps)
    a = torch.nn.functional.normalize(fake_text_encoder(ps["A"]), dim=-1).mean(0)
    torch.testing.assert_close(emb[0], a / a.norm())
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_probabilities_sum_to_one_and_match_softmax():
    slides = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.9, 0.0], [0.0, 0.0, 1.0]])
    cls = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = class_probabilities(slides, cls, logit_scale=10.0)
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    # slide 1: cosines (0.2, 0.9)/|(0.2, 0.9)| -> softmax of 10x those
    c = np.array([0.2, 0.9]) / math.hypot(0.2, 0.9)
    e = np.exp(10 * c)
    np.testing.assert_allclose(p[1].numpy(), e / e.sum(), rtol=1e-5)
    np.testing.assert_allclose(p[2].numpy(), [0.5, 0.5], rtol=1e-6)  # orthogonal to both classes


def test_metrics_on_labelled_toy_set():
    # 5 slides: 3 LUAD (one looks squamous -> wrong), 2 LUSC (both right)
    slides = torch.tensor([[1.0, 0.1, 0], [0.9, 0.0, 0], [0.1, 1.0, 0], [0.0, 1.0, 0], [0.2, 0.8, 0]])
    y = ["LUAD", "LUAD", "LUAD", "LUSC", "LUSC"]
    res = zero_shot(slides, fake_text_encoder, CLASSES, y, n_sets=50, seed=0, logit_scale=50.0)
    assert res.probs.shape == (50, 5, 2)
    np.testing.assert_allclose(res.probs.sum(-1), 1.0, rtol=1e-5)
    # by hand: recall LUAD 2/3, LUSC 2/2 -> BACC = (2/3 + 1)/2; precision LUAD 2/2, LUSC 2/3 -> macro 5/6;
    # F1 LUAD 2*(1*2/3)/(1+2/3) = 0.8, LUSC 2*(2/3*1)/(2/3+1) = 0.8 -> macro 0.8; same for every prompt set
    for r in res.per_set:
        assert r["bacc"] == pytest.approx(5 / 6)
        assert r["precision"] == pytest.approx(5 / 6)
        assert r["f1"] == pytest.approx(0.8)
    assert res.summary["bacc"] == {"mean": pytest.approx(5 / 6), "sem": pytest.approx(0.0, abs=1e-12)}
    with pytest.raises(ValueError, match="not among the classes"):
        zero_shot(slides, fake_text_encoder, CLASSES, ["LUAD"] * 4 + ["other"], n_sets=2)


def test_sem_over_prompt_sets_is_the_textbook_formula(monkeypatch):
    import gigapath_core.zeroshot as zs

    vals = iter([0.5, 0.75, 1.0, 0.75])
    monkeypatch.setattr(
        zs, "classification_metrics", lambda *a, **k: (lambda v: {"bacc": v, "precision": v, "f1": v})(next(vals))
    )
    res = zero_shot(torch.eye(3)[:2], fake_text_encoder, CLASSES, ["LUAD", "LUSC"], n_sets=4)
    x = np.array([0.5, 0.75, 1.0, 0.75])
    assert res.summary["f1"]["mean"] == pytest.approx(0.75)
    assert res.summary["f1"]["sem"] == pytest.approx(x.std(ddof=1) / math.sqrt(4))


def test_classification_metrics_against_definitions():
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], 3)
    recall = [1 / 2, 2 / 2, 1 / 2]
    precision = [1 / 2, 2 / 3, 1 / 1]
    f1 = [2 * p * r / (p + r) for p, r in zip(precision, recall)]
    assert m["bacc"] == pytest.approx(np.mean(recall))
    assert m["precision"] == pytest.approx(np.mean(precision))
    assert m["f1"] == pytest.approx(np.mean(f1))


def test_each_distinct_prompt_is_encoded_once():
    seen: list[str] = []

    def counting(texts):
        seen.extend(texts)
        return fake_text_encoder(texts)

    slides = torch.eye(3)[:2]
    res = zero_shot(slides, counting, CLASSES, n_sets=50, seed=0)
    distinct = {p for ps in res.prompt_sets for prompts in ps.values() for p in prompts}
    assert sorted(seen) == sorted(distinct)
    ref = zero_shot(slides, fake_text_encoder, CLASSES, n_sets=50, seed=0)  # same sets, same numbers
    np.testing.assert_allclose(res.probs, ref.probs, rtol=1e-6)
