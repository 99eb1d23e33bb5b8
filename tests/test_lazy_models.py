"""Models are built only for the slides and stages a run still has to do (issue #16): a re-run where every
slide is done builds none; a new slide builds each model once; reused tile embeddings need no tile encoder."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

import gigapath_core as gp
from gigapath_core import api, pipeline
from gigapath_core.errors import ConfigError

TINY_VIT = {"name": "dinov2_vit", "weights": "random", "num_workers": 0, "batch_size": 64,
            "params": {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
                       "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}}
H5_FILES = ("tiles.h5", "tile_embeddings.h5", "slide_embedding.h5")


def _cfg(folder: Path, slide_encoder: dict | None = None) -> dict:
    return {"inputs": {"slides": [str(folder / "*.svs")]}, "readers": ["openslide"], "device": "cpu",
            "tiler": {"name": "otsu", "params": {"min_occupancy": 0.99}},  # 13 tiles: a short test
            "tile_encoder": TINY_VIT, "slide_encoder": slide_encoder or {"name": "mean"}}


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def _h5(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {"datasets": {k: f[k][()] for k in f}, "attrs": {k: f.attrs[k] for k in f.attrs}}


def _snapshot(slide_dir: Path) -> dict:
    """Every output file's bytes and mtime."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(slide_dir.iterdir()) if p.is_file()}


@pytest.fixture
def builds(monkeypatch):
    """Counts ``api.build`` calls per model kind (and the tiler), and ``pipeline.get_models`` calls; each run
    starts with no model cached, as a new process would."""
    calls: Counter = Counter()
    build, get_models = api.build, pipeline.get_models

    def counting_build(kind, *args, **kwargs):
        if kind in ("tiler", "tile_encoder", "slide_encoder"):  # not the slide readers
            calls[kind] += 1
        return build(kind, *args, **kwargs)

    def counting_get_models(*args, **kwargs):
        calls["get_models"] += 1
        return get_models(*args, **kwargs)

    monkeypatch.setattr(api, "build", counting_build)
    monkeypatch.setattr(pipeline, "get_models", counting_get_models)
    pipeline._MODELS.clear()
    yield calls
    pipeline._MODELS.clear()


@pytest.fixture
def one_slide(example_slide, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(example_slide, folder / "a.svs")
    return folder


def test_fully_done_rerun_builds_no_model(one_slide, tmp_path, builds, capsys):
    out = tmp_path / "out"
    assert gp.run(_cfg(one_slide), out=str(out)) == 0
    assert builds == Counter({"tiler": 1, "tile_encoder": 1, "slide_encoder": 1, "get_models": 2})  # describe + slide
    first, before = _manifest(out)["a"], _snapshot(out / "a")
    h5_before = {name: _h5(out / "a" / name) for name in H5_FILES}
    capsys.readouterr()
    builds.clear()
    pipeline._MODELS.clear()  # a new process

    assert gp.run(_cfg(one_slide), out=str(out)) == 0
    assert builds == Counter()  # no tiler, no encoder, not even a get_models call
    row = _manifest(out)["a"]
    assert row["this_run"] == "skipped" and first["this_run"] == "processed"
    assert {k: v for k, v in row.items() if k != "this_run"} == {k: v for k, v in first.items() if k != "this_run"}
    assert row["weights"] == "tile_encoder=random; slide_encoder=none (no parameters)"
    assert _snapshot(out / "a") == before  # no output rewritten (bytes and mtimes)
    for name in H5_FILES:
        after = _h5(out / "a" / name)
        assert after["attrs"].keys() == h5_before[name]["attrs"].keys()
        for k, v in h5_before[name]["datasets"].items():
            np.testing.assert_array_equal(after["datasets"][k], v)
    err = capsys.readouterr().err
    assert "tile encoder: dinov2_vit not loaded (no slide left to process needs it)" in err
    assert "RANDOM weights" not in err and "0 ok, 1 skipped, 0 failed" in err


def test_a_new_slide_builds_each_model_once(one_slide, example_slide, tmp_path, builds):
    out = tmp_path / "out"
    assert gp.run(_cfg(one_slide), out=str(out)) == 0
    before = _snapshot(out / "a")
    shutil.copy(example_slide, one_slide / "b.svs")
    builds.clear()
    pipeline._MODELS.clear()

    assert gp.run(_cfg(one_slide), out=str(out)) == 0
    assert builds["tiler"] == 1 and builds["tile_encoder"] == 1 and builds["slide_encoder"] == 1
    rows = _manifest(out)
    assert rows["a"]["this_run"] == "skipped" and rows["b"]["this_run"] == "processed"
    assert rows["b"]["status"] == "ok" and rows["b"]["n_tiles"] == rows["a"]["n_tiles"] == "13"
    assert _snapshot(out / "a") == before
    # the same file under another id: the same embeddings (each model seeded the same way in every run)
    a, b = _h5(out / "a" / "slide_embedding.h5"), _h5(out / "b" / "slide_embedding.h5")
    np.testing.assert_array_equal(a["datasets"]["embedding"], b["datasets"]["embedding"])
    ta, tb = _h5(out / "a" / "tile_embeddings.h5"), _h5(out / "b" / "tile_embeddings.h5")
    np.testing.assert_array_equal(ta["datasets"]["features"], tb["datasets"]["features"])
    assert ta["datasets"]["features"].shape == (13, 48)


def test_reused_tile_embeddings_need_no_tile_encoder(one_slide, tmp_path, builds):
    out = tmp_path / "out"
    assert gp.run(_cfg(one_slide), out=str(out)) == 0
    tile_emb = (out / "a" / "tile_embeddings.h5").read_bytes()
    builds.clear()
    pipeline._MODELS.clear()
    abmil = {"name": "abmil_only", "weights": "random"}  # another slide encoder: only that stage is redone

    assert gp.run(_cfg(one_slide, abmil), out=str(out)) == 0
    assert builds["tile_encoder"] == 0 and builds["slide_encoder"] == 1
    row = _manifest(out)["a"]
    assert row["this_run"] == "processed" and row["weights"] == "tile_encoder=random; slide_encoder=random"
    assert (out / "a" / "tile_embeddings.h5").read_bytes() == tile_emb
    emb = _h5(out / "a" / "slide_embedding.h5")
    assert emb["attrs"]["slide_encoder"] == "abmil_only" and np.isfinite(emb["datasets"]["embedding"]).all()


def test_config_errors_still_come_first_when_nothing_is_left_to_do(one_slide, tmp_path, builds):
    out = tmp_path / "out"
    assert gp.run(_cfg(one_slide), out=str(out)) == 0
    manifest = (out / "manifest.csv").read_bytes()
    bad = _cfg(one_slide)
    bad["tile_encoder"] = {**TINY_VIT, "params": {**TINY_VIT["params"], "model_kwarg": {}}}  # a typo
    with pytest.raises(ConfigError, match=r"tile_encoder\.params\.model_kwarg: unknown parameter .*did you mean "
                                          r"'model_kwargs'"):
        gp.run(bad, out=str(out))
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="device: 'cuda' requested but torch sees no CUDA device"):
            gp.run({**_cfg(one_slide), "device": "cuda"}, out=str(out))
    assert (out / "manifest.csv").read_bytes() == manifest  # nothing written by the refused runs
