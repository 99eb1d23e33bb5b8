"""Patient-grouped, label-stratified folds: never a patient on both sides, reproducible, written and re-read."""

from __future__ import annotations

from collections import Counter

import pytest

from gigapath_core.errors import ConfigError
from gigapath_core.evaluation.folds import make_folds, read_splits, write_splits


def _cohort():
    """30 patients with 1-4 slides each (patient i has 1 + i % 4 slides); label by patient, 12 of 30 positive."""
    slides, patients, labels = [], [], []
    for p in range(30):
        for s in range(1 + p % 4):
            slides.append(f"P{p:02d}-S{s}")
            patients.append(f"P{p:02d}")
            labels.append("pos" if p % 5 in (0, 3) else "neg")
    return slides, patients, labels


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_folds_never_split_a_patient(val_fraction):
    slides, patients, labels = _cohort()
    assert max(Counter(patients).values()) == 4  # patients really have several slides
    pid = dict(zip(slides, patients))
    splits = make_folds(slides, patients, labels, k=5, seed=3, val_fraction=val_fraction)
    tested = Counter()
    for fold in splits.folds:
        owners = {}
        for split in ("train", "val", "test"):
            for s in fold[split]:
                assert owners.setdefault(pid[s], split) == split, f"patient {pid[s]} in two splits"
        assert len(fold["train"]) + len(fold["val"]) + len(fold["test"]) == len(slides)
        assert bool(fold["val"]) == (val_fraction > 0)
        tested.update(fold["test"])
    assert set(tested) == set(slides) and set(tested.values()) == {1}


def test_folds_are_stratified():
    slides, patients, labels = _cohort()
    lab = dict(zip(slides, labels))
    splits = make_folds(slides, patients, labels, k=5, seed=0)
    for fold in splits.folds:  # 12/30 patients positive: every test fold must hold both classes
        assert {lab[s] for s in fold["test"]} == {"pos", "neg"}


def test_reproducible_and_order_independent():
    slides, patients, labels = _cohort()
    a = make_folds(slides, patients, labels, k=5, seed=7)
    b = make_folds(slides[::-1], patients[::-1], labels[::-1], k=5, seed=7)
    c = make_folds(slides, patients, labels, k=5, seed=8)
    assert a.folds == b.folds
    assert a.folds != c.folds


def test_write_read_roundtrip(tmp_path):
    slides, patients, labels = _cohort()
    splits = make_folds(slides, patients, labels, k=4, seed=1, val_fraction=0.2)
    write_splits(tmp_path / "splits.csv", splits)
    back = read_splits(tmp_path / "splits.csv")
    assert back.folds == splits.folds and back.patients == splits.patients and back.k == 4
    header = (tmp_path / "splits.csv").read_text().splitlines()[0]
    assert header == "fold,split,slide_id,patient_id"


def test_reading_splits_that_split_a_patient_fails(tmp_path):
    p = tmp_path / "splits.csv"
    p.write_text("fold,split,slide_id,patient_id\n0,train,A1,A\n0,test,A2,A\n0,test,B1,B\n"
                 "1,test,A1,A\n1,train,A2,A\n1,train,B1,B\n")
    with pytest.raises(ConfigError, match="patient 'A' has slides in both train and test"):
        read_splits(p)


def test_reading_splits_with_a_slide_never_tested_fails(tmp_path):
    p = tmp_path / "splits.csv"
    p.write_text("fold,split,slide_id,patient_id\n0,train,A1,A\n0,test,B1,B\n1,train,A1,A\n1,test,B1,B\n")
    with pytest.raises(ConfigError, match="'A1' is in the test split of 0 folds"):
        read_splits(p)


def test_too_few_patients_is_a_config_error():
    with pytest.raises(ConfigError, match="folds.k: 5 folds need at least 5 patients; the labels have 3"):
        make_folds(["a", "b", "c", "d"], ["p1", "p1", "p2", "p3"], [0, 0, 1, 1], k=5)


def test_more_folds_than_slides_of_any_class_is_a_config_error():
    """scikit-learn's StratifiedGroupKFold raises a bare ValueError here; the run says it on one line."""
    slides = [f"s{i}" for i in range(6)]
    with pytest.raises(ConfigError, match=r"^folds.k: 5 label-stratified parts need at least 5 slides of one "
                                          r"class; the slides per class are 3, 3$"):
        make_folds(slides, [f"p{i}" for i in range(6)], [0, 1] * 3, k=5)
