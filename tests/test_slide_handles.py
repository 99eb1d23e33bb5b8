"""Slide files are closed on every path: no ``ResourceWarning: unclosed file`` from a run, whether a slide
succeeds or fails (the tile stage's own reader handle, the tifffile reader when parsing fails after the open,
tiatoolbox's zarr store)."""

from __future__ import annotations

import gc
import shutil
import warnings
from pathlib import Path

import pytest

import gigapath_core as gp
from gigapath_core import pipeline
from gigapath_core.errors import SlideReadError
from gigapath_core.jobs import run

from faults_helpers import manifest

ROOT = Path(__file__).resolve().parent.parent
OS1 = ROOT / "examples" / "data" / "OS-1-detail.ome.tif"
TINY_VIT = {"model_name": "vit_small_patch14_dinov2", "img_size": 28, "resize": 32,
            "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}


def _unclosed(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


def test_the_tile_stage_closes_its_slide_handle_when_the_slide_fails_and_when_it_succeeds(tmp_path, monkeypatch):
    for name in ("good", "bad"):
        shutil.copy(OS1, tmp_path / f"{name}.ome.tif")
    datasets = []

    class Recorded(pipeline.TileDataset):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            datasets.append(self)

    real_embed = pipeline.embed_tiles

    def embed_or_fail(encoder, ds, **kwargs):
        if Path(ds.slide_path).name.startswith("bad"):
            ds.read(0)  # the handle is open, then a tile fails
            raise SlideReadError(ds.slide_path, "cannot read tile 1: corrupt tile (test)")
        return real_embed(encoder, ds, **kwargs)

    monkeypatch.setattr(pipeline, "TileDataset", Recorded)
    monkeypatch.setattr(pipeline, "embed_tiles", embed_or_fail)
    cfg = {"inputs": {"slides": [str(tmp_path / "*.ome.tif")]}, "device": "cpu", "readers": ["tifffile"],
           "tile_encoder": {"name": "dinov2_vit", "params": TINY_VIT, "weights": "random", "batch_size": 64,
                            "num_workers": 0}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(cfg, out=str(tmp_path / "out")) == 1
        gc.collect()
    rows = manifest(tmp_path / "out")
    assert rows["good"]["status"] == "ok" and rows["bad"]["status"] == "failed"
    assert rows["bad"]["reason"].endswith("cannot read tile 1: corrupt tile (test)")
    assert len(datasets) == 2 and all(ds._wsi is None for ds in datasets)  # both opened, both closed
    assert _unclosed(caught) == []


def test_tifffile_reader_closes_the_file_when_parsing_fails_after_the_open(monkeypatch):
    from gigapath_plugins.readers import tifffile_ome

    def broken(self):
        raise RuntimeError("damaged series (test)")

    monkeypatch.setattr(tifffile_ome.TiffFileWSI, "_parse_levels", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="damaged series"):
            gp.build("slide_reader", "tifffile").open(str(OS1))
        gc.collect()
    assert _unclosed(caught) == []


def test_tiatoolbox_reader_close_releases_every_file_handle():
    """tiatoolbox reads TIFFs through tifffile's zarr store, whose file cache opens the slide again; close()
    closes that handle too (it used to stay open until exit: a ResourceWarning at shutdown)."""
    pytest.importorskip("tiatoolbox")
    wsi = gp.build("slide_reader", "tiatoolbox").open(str(OS1))
    assert wsi.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)
    handles = list(wsi._wsi._zarr_store._filecache.files)  # tifffile FileCache: FileHandle -> use count
    assert handles and not any(fh.closed for fh in handles)
    wsi.close()
    assert all(fh.closed for fh in handles) and wsi._wsi.tiff.filehandle.closed


def test_a_fresh_slide_reads_tiles_h5_once_for_the_tile_stage(tmp_path, monkeypatch):
    """_run_stages reads tiles.h5's datasets and their attributes in one open (store.read_h5_all)."""
    import h5py

    opened = []
    real_file = h5py.File

    def counting(name, mode="r", *a, **k):
        opened.append((Path(name).name, mode))
        return real_file(name, mode, *a, **k)

    shutil.copy(OS1, tmp_path / "s.ome.tif")
    cfg = {"inputs": {"slides": [str(tmp_path / "s.ome.tif")]}, "device": "cpu", "readers": ["tifffile"],
           "tile_encoder": {"name": "dinov2_vit", "params": TINY_VIT, "weights": "random", "batch_size": 64,
                            "num_workers": 0}}
    monkeypatch.setattr(h5py, "File", counting)
    monkeypatch.setattr("gigapath_core.jobs.try_write_run_report", lambda out: None)  # report.html reads it too
    assert run(cfg, out=str(tmp_path / "out")) == 0
    writes = [n for n, mode in opened if mode == "w"]
    assert [n.split(".")[1] for n in writes] == ["gigapath-tmp-tiles", "gigapath-tmp-tile_embeddings"]
    assert opened.count(("tiles.h5", "r")) == 1  # was 2: datasets, then their attributes
