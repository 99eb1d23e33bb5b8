"""The embed job end to end: output contract, manifest, failures recorded, resume."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gigapath_core as gp
from gigapath_core.store import read_h5

TINY_VIT = {"name": "dinov2_vit", "weights": "random", "num_workers": 0, "batch_size": 64,
            "params": {"model_name": "vit_small_patch14_dinov2", "model_kwargs": {"depth": 1}}}


def _manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


@pytest.fixture
def slide_folder(example_slide, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(example_slide, folder / "good.svs")
    (folder / "corrupt.svs").write_bytes(b"II*\x00" + bytes(range(256)) * 8)  # TIFF magic, garbage after
    return folder


def _cfg(folder: Path) -> dict:
    return {"inputs": {"slides": [str(folder / "*.svs")]}, "readers": ["openslide"], "tile_encoder": TINY_VIT,
            "slide_encoder": {"name": "mean", "params": {"in_dim": 384}}}


def test_output_contract(slide_folder, tmp_path):
    out = tmp_path / "out"
    assert gp.run(_cfg(slide_folder), out=str(out)) == 1  # one slide failed
    d = out / "good"
    tiles, tattrs = read_h5(d / "tiles.h5")
    emb, eattrs = read_h5(d / "tile_embeddings.h5")
    slide, sattrs = read_h5(d / "slide_embedding.h5")
    n = len(tiles["coords"])
    assert n > 0 and tiles["coords"].dtype == np.int64 and tiles["coords"].shape == (n, 2)
    # grid coords are multiples of the tile size at 0.5 µm/px; level-0 = grid * 0.5 / mpp (mpp 0.499)
    assert (tiles["grid_coords"] % 256 == 0).all()
    np.testing.assert_allclose(tiles["coords"], tiles["grid_coords"] * 0.5 / 0.499, atol=0.5)
    assert tattrs["source_mpp_x"] == pytest.approx(0.499) and tattrs["target_mpp"] == 0.5
    assert tattrs["tile_size"] == 256 and tattrs["reader"] == "openslide"
    assert emb["features"].shape == (n, 384) and emb["features"].dtype == np.float32
    np.testing.assert_array_equal(emb["grid_coords"], tiles["grid_coords"])  # format_version 2 (docs/formats.md)
    np.testing.assert_array_equal(emb["coords"], tiles["coords"])
    assert eattrs["format_version"] == 2 and tattrs["format_version"] == 2
    assert eattrs["weights_source"] == "random"
    np.testing.assert_allclose(slide["embedding"], emb["features"].mean(0), rtol=1e-5, atol=1e-6)  # mean pool
    assert sattrs["n_tiles"] == n
    assert (d / "thumbnail.png").is_file()
    geo = json.loads((d / "tissue.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert not list(out.rglob(".gigapath-tmp-*"))  # no temp file left behind
    rows = _manifest(out)
    assert rows["good"]["status"] == "ok" and int(rows["good"]["n_tiles"]) == n
    assert rows["corrupt"]["status"] == "failed" and rows["corrupt"]["error_type"] == "SlideOpenError"
    assert "corrupt.svs: no reader could open it" in rows["corrupt"]["reason"]


def test_rerun_redoes_only_the_failed_slide(slide_folder, example_slide, tmp_path):
    out = tmp_path / "out"
    assert gp.run(_cfg(slide_folder), out=str(out)) == 1
    first = _manifest(out)
    assert first["good"]["this_run"] == "processed" and first["corrupt"]["this_run"] == "failed"
    good_status = (out / "good" / "status.json").stat().st_mtime_ns
    good_emb = (out / "good" / "tile_embeddings.h5").stat().st_mtime_ns
    assert gp.run(_cfg(slide_folder), out=str(out)) == 1  # still corrupt
    rows = _manifest(out)
    assert rows["good"]["this_run"] == "skipped" and rows["corrupt"]["status"] == "failed"
    # the skipped slide keeps its real row: status, reason, reader, tiles, weights and the first run's timings
    keep = ("status", "reason", "reader", "n_tiles", "weights", "seconds_tiling", "seconds_tile_encoder",
            "seconds_total")
    assert {k: rows["good"][k] for k in keep} == {k: first["good"][k] for k in keep}
    assert rows["good"]["status"] == "ok" and float(rows["good"]["seconds_total"]) > 0
    assert (out / "good" / "status.json").stat().st_mtime_ns == good_status
    shutil.copy(example_slide, slide_folder / "corrupt.svs")  # the user fixes the file
    assert gp.run(_cfg(slide_folder), out=str(out)) == 0
    rows = _manifest(out)
    assert rows["corrupt"]["status"] == "ok" and rows["corrupt"]["this_run"] == "processed"
    assert rows["good"]["this_run"] == "skipped"
    assert (out / "good" / "tile_embeddings.h5").stat().st_mtime_ns == good_emb


def test_changed_stage_config_redoes_only_later_stages(slide_folder, tmp_path):
    (slide_folder / "corrupt.svs").unlink()
    out = tmp_path / "out"
    assert gp.run(_cfg(slide_folder), out=str(out)) == 0
    tiles_mtime = (out / "good" / "tiles.h5").stat().st_mtime_ns
    emb_mtime = (out / "good" / "tile_embeddings.h5").stat().st_mtime_ns
    cfg = _cfg(slide_folder)
    cfg["tile_encoder"] = {**TINY_VIT, "params": {**TINY_VIT["params"], "model_kwargs": {"depth": 2}}}
    assert gp.run(cfg, out=str(out)) == 0
    assert _manifest(out)["good"]["status"] == "ok"  # not skipped: its config changed
    assert (out / "good" / "tiles.h5").stat().st_mtime_ns == tiles_mtime  # tiling reused
    assert (out / "good" / "tile_embeddings.h5").stat().st_mtime_ns != emb_mtime  # embeddings redone


def test_quickstart_config_runs(tmp_path):
    root = Path(__file__).resolve().parent.parent
    assert gp.run(root / "examples" / "quickstart.yaml", out=str(tmp_path)) == 0
    rows = _manifest(tmp_path)
    assert rows["CMU-1-Small-Region"]["status"] == "ok"
    assert "tile_encoder=random" in rows["CMU-1-Small-Region"]["weights"]
