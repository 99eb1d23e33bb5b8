"""Every ``gigapath export`` reads back with the grid the run wrote: same level-0 ``coords``, ``grid_coords`` and
``tile_size``, for 256-px and 128-px tiles (the stain example's size) on the 0.2271 µm/px OS-2-ndpi slide. With
128-px tiles a reader that falls back to 256 doubles every grid position (cells 0, 2, 4...), which these
comparisons catch. Also: the tile size of other tools' own files, export of a folder that is no embed run, the
``--encoder`` default."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import gigapath_core as gp
from _export_run import ROOT, embeddings
from gigapath_core.cli import main
from gigapath_core.export import export_run
from gigapath_core.interop import read_tile_features
from gigapath_core.interop.features import file_grid
from gigapath_core.store import read_h5

SID = "OS-2-ndpi"
SLIDE = ROOT / "examples" / "data" / "OS-2-ndpi.ome.tif"
ENC = "synthetic"
#: format -> the file(s) of the slide under OUT/export/<format>/ that our reader is pointed at
FILES = {"trident": ["20x_{ts}px_0px_overlap/features_synthetic/{sid}.h5"],
         "clam": ["h5_files/{sid}.h5", "pt_files/{sid}.pt"], "stamp": ["{sid}.h5"], "prov-gigapath": ["{sid}.h5"]}
CASES = [(fmt, rel) for fmt, rels in FILES.items() for rel in rels]


def make_run(out, tile_size: int):
    """Tile OS-2-ndpi at ``tile_size`` px (0.5 µm/px) with the real tiler; random 8-d tile embeddings written as
    the pipeline writes them (the coords/grid_coords attributes of tiles.h5 copied)."""
    from gigapath_core.stages.tile_embedding import write_tile_embeddings
    from gigapath_core.store import rebuild_manifest

    gp.run({"inputs": {"slides": [str(SLIDE)]}, "output": str(out), "readers": ["openslide", "tifffile"],
            "tiler": {"name": "otsu", "params": {"tile_size": tile_size}}})
    sdir = out / SID
    with h5py.File(sdir / "tiles.h5", "r") as f:
        coords, grid = f["coords"][()], f["grid_coords"][()]
        dattrs = {k: dict(f[k].attrs) for k in ("coords", "grid_coords")}
    feats = np.random.default_rng(tile_size).normal(size=(len(coords), 8)).astype(np.float32)
    write_tile_embeddings(sdir / "tile_embeddings.h5", feats, coords, grid,
                          {"tile_encoder": ENC, "weights_source": "random"}, dattrs)
    rebuild_manifest(out, [SID])
    return out


@pytest.fixture(scope="module", params=[256, 128], ids=["256px", "128px"])
def run(request, tmp_path_factory):
    out = make_run(tmp_path_factory.mktemp(f"grid{request.param}") / "run", request.param)
    for fmt in (*FILES, "anndata"):
        assert export_run(out, fmt).exported == [SID]
    return out, request.param


@pytest.mark.parametrize("fmt,rel", CASES, ids=[f"{f}:{r.split('/')[0]}" for f, r in CASES])
def test_every_export_reads_back_with_the_runs_grid(run, fmt, rel):
    out, ts = run
    feats, level0, grid = embeddings(out / SID)
    mpp = float(read_h5(out / SID / "tiles.h5")[1]["source_mpp_x"])
    assert len(grid) > 4 and (grid % ts == 0).all()
    if ts == 128:  # odd cells exist: a 256 fallback could not reproduce them
        assert ((grid // 128) % 2 == 1).any()
    for detect in (fmt, "auto"):
        tf = read_tile_features(out / "export" / fmt / rel.format(ts=ts, sid=SID), fmt=detect)
        assert tf.source_format == fmt and tf.tile_size == ts and tf.target_mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(tf.features, feats)
        np.testing.assert_array_equal(tf.grid_coords, grid)
        np.testing.assert_array_equal(tf.coords, level0)  # every export records the level-0 mpp (or coords)
        assert tf.level0_mpp == pytest.approx(mpp, rel=1e-9)


def test_anndata_export_keeps_both_units_and_the_tile_size(run):
    import anndata

    out, ts = run
    feats, level0, grid = embeddings(out / SID)
    a = anndata.read_h5ad(out / "export" / "anndata" / f"{SID}.h5ad")
    np.testing.assert_array_equal(a.X, feats)
    np.testing.assert_array_equal(a.obs[["x", "y"]].to_numpy(), level0)
    np.testing.assert_array_equal(a.obs[["grid_x", "grid_y"]].to_numpy(), grid)
    np.testing.assert_array_equal(a.obsm["spatial"], level0)
    meta = a.uns["slides"][SID]
    assert meta["tile_size"] == ts and meta["target_mpp"] == 0.5
    assert meta["tile_size_level0"] == pytest.approx(ts * 0.5 / meta["level0_mpp_x"])


def test_trident_job_folder_and_stamp_attributes_name_the_tile_size(run):
    out, ts = run
    with h5py.File(out / "export" / "trident" / f"20x_{ts}px_0px_overlap" / "features_synthetic" / f"{SID}.h5") as f:
        assert f["coords"].attrs["patch_size"] == ts and f["coords"].attrs["target_magnification"] == 20
    root = read_h5(out / "export" / "stamp" / f"{SID}.h5")[1]
    assert root["tile_size_px"] == ts and root["tile_size_um"] == ts * 0.5
    clam = out / "export" / "clam" / "h5_files" / f"{SID}.h5"
    with h5py.File(clam, "a") as f:
        assert f["coords"].attrs["tile_size"] == ts  # ours: CLAM's patch_size is the side read at patch_level
        assert f["coords"].attrs["patch_size"] != ts  # ... the 0.2271 µm/px level-0 side: 564 or 282 px
        del f["coords"].attrs["tile_size"]  # an export written before that attribute
    for detect in ("clam", "trident"):  # CLAM's patch_size under TRIDENT's name must not be read as TRIDENT's
        tf = read_tile_features(clam, fmt=detect)
        assert tf.tile_size == ts
        np.testing.assert_array_equal(tf.grid_coords, embeddings(out / SID)[2])


def test_other_tools_files_give_their_own_tile_size():
    """Files as TRIDENT / STAMP / CLAM / prov-gigapath write them: the cell side in px at 0.5 µm/px."""
    # trident/IO.py coords_to_h5: patch_size px at target_magnification (10 / mag µm/px)
    assert file_grid("trident", {}, {"patch_size": 256, "target_magnification": 20}, None, 0.5) == (256, 0.5)
    assert file_grid("trident", {}, {"patch_size": 512, "target_magnification": 20}, 256, 0.5) == (512, 0.5)
    assert file_grid("trident", {}, {"patch_size": 256, "target_magnification": 40}, None, 0.5) == (128, 0.5)
    # STAMP src/stamp/preprocessing/__init__.py: tile_size_um is the tile; tile_size_px what the extractor saw
    stamp = {"unit": "um", "tile_size_um": 128.0, "tile_size_px": 224}
    assert file_grid("stamp", stamp, {}, None, 0.5) == (256, 0.5)
    # CLAM and official prov-gigapath files record no grid: the caller's tile_size, else 256
    clam = {"patch_size": 512, "patch_level": 0, "downsample": (1.0, 1.0)}
    assert file_grid("clam", {}, clam, None, 0.5) == (256, 0.5)
    assert file_grid("clam", {}, clam, 224, 0.5) == (224, 0.5)
    assert file_grid("prov-gigapath", {}, {}, None, 0.5) == (256, 0.5)
    # a tile_size attribute without our target_mpp beside it is not ours: not read
    assert file_grid("clam", {}, {"tile_size": 99}, None, 0.5) == (256, 0.5)


def test_a_finetune_folder_is_not_exported(tmp_path, capsys):
    """``gigapath export <finetune output>``: one line, exit 2, nothing written (fold_<k>/status.json are no
    slides)."""
    ft = tmp_path / "finetune"
    for k in range(3):
        (ft / f"fold_{k}").mkdir(parents=True)
        (ft / f"fold_{k}" / "status.json").write_text(json.dumps({"status": "ok", "fold": k}))
    (ft / "config.yaml").write_text("job: finetune\ndata: {tile_size: 256}\n")
    (ft / "metrics.json").write_text("{}")
    before = sorted(p.relative_to(ft) for p in ft.rglob("*"))
    assert main(["export", str(ft), "--format", "clam"]) == 2
    cap = capsys.readouterr()
    assert cap.err.strip() == (f"gigapath: error: export.out: {ft} is not an embed run folder (no manifest.csv; "
                               "it looks like a finetune output); give the embed run's output folder")
    assert "WARNING" not in cap.out + cap.err and not (ft / "export").exists()
    assert sorted(p.relative_to(ft) for p in ft.rglob("*")) == before
    (ft / "config.yaml").unlink()  # metrics.json alone says the same
    assert main(["export", str(ft), "--format", "stamp"]) == 2
    assert "it looks like a finetune output" in capsys.readouterr().err


def test_encoder_default_is_the_recorded_name_and_help_says_so(capsys):
    from gigapath_core.export._source import SlideFeatures
    from gigapath_core.export._write import encoder_name

    def sf(tile, weights):
        return SlideFeatures("s", np.zeros((0, 2), np.float32), None, np.zeros((0, 2), np.int64), (0.25, 0.25), 256,
                             0.5, tile, weights, 0, None, [], "")

    assert encoder_name(sf("dinov2-vits14", "random")) == "dinov2-vits14"  # the stain example: a preset
    assert encoder_name(sf("dinov2_vit", "random")) == "dinov2_vit"  # a plugin
    # the Prov-GigaPath preset with its released weights: TRIDENT's and STAMP's name
    assert encoder_name(sf("prov-gigapath", "hf_hub:prov-gigapath/prov-gigapath/pytorch_model.bin")) == "gigapath"
    assert encoder_name(sf("prov-gigapath", "random")) == "prov-gigapath"
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the preset name if it used one, e.g. dinov2-vits14, else the plugin name, e.g. dinov2_vit" in text
