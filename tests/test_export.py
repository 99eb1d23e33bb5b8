"""``gigapath export``: each format checked against the other tool's own reading logic (cited per test) on a real
0.2271 µm/px slide, where level-0 px (tile side 563.6) and 0.5 µm grid px (tile side 256) differ."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from _export_run import SLIDES, embeddings, make_run, rewrite
from gigapath_core.cli import main
from gigapath_core.errors import ConfigError
from gigapath_core.export import export_run
from gigapath_core.store import read_h5

IDS = [s.split(".")[0] for s in SLIDES]  # OS-1-detail, OS-2-ndpi


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export"))


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("export"))
    return dst


def _ours(run: Path, sid: str):
    """Our tiles: features, level-0 coords, grid coords, level-0 mpp (x), read size at level 0."""
    feats, level0, grid = embeddings(run / sid)
    _, tattrs = read_h5(run / sid / "tiles.h5")
    assert int(tattrs["level"]) == 0  # single-level crops: the read happens at level 0
    return feats, level0, grid, float(tattrs["source_mpp_x"]), int(tattrs["read_size"])


def _h5(path: Path):
    with h5py.File(path, "r") as f:
        return ({k: f[k][()] for k in f}, dict(f.attrs), {k: dict(f[k].attrs) for k in f})


def test_trident_layout_answers_tridents_readers(run_dir):
    res = export_run(run_dir, "trident", cohort=False)
    job = run_dir / "export" / "trident" / "20x_256px_0px_overlap"  # trident/Processor.py run_patching_job saveto
    for sid in IDS:
        feats, level0, grid, mpp, read_size = _ours(run_dir, sid)
        data, root, per = _h5(job / "features_dinov2_vit" / f"{sid}.h5")  # features_{enc_name}/{name}.h5
        np.testing.assert_array_equal(data["features"], feats)
        assert data["features"].dtype == np.float32 and data["coords"].dtype == np.int64
        np.testing.assert_array_equal(data["coords"], level0)  # level-0 px, not grid px
        assert sid == "OS-1-detail" or not np.array_equal(data["coords"], grid)  # OS-1: one tile at (0, 0)
        a = per["coords"]
        assert a["patch_size"] == 256 and a["target_magnification"] == 20 and a["overlap"] == 0
        assert a["level0_magnification"] == pytest.approx(10 / mpp)  # 44.03x for 0.2271 µm/px
        assert a["name"] == sid and a["unit"] == "level-0 px" and a["level0_mpp"] == pytest.approx(mpp)
        assert per["features"]["encoder"] == "dinov2_vit" and per["features"]["name"] == sid
        # WSIPatcher (trident/wsi_objects/WSIPatcher.py): pixel size = 10 / mag; reads round(patch_size * ds) px
        ds = (10 / a["target_magnification"]) / (10 / a["level0_magnification"])
        assert round(a["patch_size"] * ds) == read_size == 564
        # coords + patch_size_level0 cover our tiles: 563 vs the exact 563.6 (within one level-0 px)
        assert a["patch_size_level0"] == 563 and abs(a["patch_size_level0"] - 256 * 0.5 / mpp) < 1
        # TRIDENT's GigaPath slide encoder: tile_size = patch_size_level0, cell = floor(coords / tile_size)
        np.testing.assert_array_equal(data["coords"] // a["patch_size_level0"], grid // 256)
        pdata, _, pper = _h5(job / "patches" / f"{sid}_patches.h5")  # WSI.extract_tissue_coords
        np.testing.assert_array_equal(pdata["coords"], level0)
        assert pper["coords"]["patch_size_level0"] == 563 and "features" not in pdata
        # slide features as WSI.extract_slide_features writes them; mean pooling is TRIDENT's mean-<patch encoder>
        sdata, _, _ = _h5(job / "slide_features_mean-dinov2_vit" / f"{sid}.h5")
        np.testing.assert_array_equal(sdata["features"], read_h5(run_dir / sid / "slide_embedding.h5")[0]["embedding"])
        np.testing.assert_allclose(sdata["features"], feats.mean(0), rtol=1e-5, atol=1e-6)
    assert sorted(res.exported) == IDS and res.not_exported[0]["slide_id"] == "corrupt"


def test_trident_grid_cells_are_consecutive_on_the_larger_slide(run_dir):
    export_run(run_dir, "trident", run_dir / "trident2", encoder="gigapath")
    data, _, per = _h5(run_dir / "trident2" / "20x_256px_0px_overlap" / "features_gigapath" / "OS-2-ndpi.h5")
    cells = data["coords"] // per["coords"]["patch_size_level0"]
    assert sorted(set(cells[:, 0].tolist())) == [0, 1, 2] and data["coords"][:, 0].max() == 1127


def test_clam_layout_answers_clams_readers(run_dir):
    export_run(run_dir, "clam")
    dest = run_dir / "export" / "clam"
    for sid in IDS:
        feats, level0, grid, mpp, read_size = _ours(run_dir, sid)
        # dataset_modules/dataset_generic.py: <data_dir>/h5_files/<slide_id>.h5 features + coords
        data, _, per = _h5(dest / "h5_files" / f"{sid}.h5")
        np.testing.assert_array_equal(data["features"], feats)
        np.testing.assert_array_equal(data["coords"], level0)
        # ... and <data_dir>/pt_files/<slide_id>.pt, a plain tensor
        pt = torch.load(dest / "pt_files" / f"{sid}.pt", weights_only=True)
        assert pt.dtype == torch.float32 and torch.equal(pt, torch.from_numpy(feats))
        # dataset_h5.py Whole_Slide_Bag_FP: read_region(coord, patch_level, (patch_size, patch_size))
        for a in (per["coords"], _h5(dest / "patches" / f"{sid}.h5")[2]["coords"]):
            assert a["patch_level"] == 0 and a["patch_size"] == read_size == 564
            assert tuple(a["downsample"]) == (1.0, 1.0) and a["name"] == sid
            assert a["level0_mpp"] == pytest.approx(mpp) and a["unit"] == "level-0 px"
        # the region read covers our tile: 564 level-0 px = 256 px at 0.5 µm/px, to one px
        assert abs(per["coords"]["patch_size"] - 256 * 0.5 / mpp) <= 0.5


def test_stamp_layout_answers_stamps_reader(run_dir):
    export_run(run_dir, "stamp")
    dest = run_dir / "export" / "stamp"
    for sid in IDS:
        feats, level0, grid, mpp, _ = _ours(run_dir, sid)
        data, root, _ = _h5(dest / f"{sid}.h5")
        np.testing.assert_array_equal(data["feats"], feats)  # BagDataset.__getitem__ reads 'feats'
        # src/stamp/modeling/data.py get_coords: tile_size_um set -> coords are µm; slide mpp = um / px
        assert root["unit"] == "um" and root["feat_type"] == "tile" and root["extractor"] == "dinov2_vit"
        assert root["tile_size_um"] == 128.0 and root["tile_size_px"] == 256 and "stamp_version" not in root
        coords_um = data["coords"]
        np.testing.assert_allclose(coords_um, level0 * mpp, atol=mpp)  # level-0 px x mpp, to one px
        stamp_mpp = root["tile_size_um"] / root["tile_size_px"]
        # src/stamp/encoding/encoder/gigapath.py: coords_px = coords_um / mpp, then floor(/256) in the model
        np.testing.assert_array_equal(np.floor(coords_um / stamp_mpp / 256), grid // 256)
    with open(dest / "slide_table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["PATIENT"], r["FILENAME"]) for r in rows] == [(s, f"{s}.h5") for s in IDS]


def test_provgigapath_layout_gives_grid_px(run_dir):
    export_run(run_dir, "prov-gigapath")
    for sid in IDS:
        feats, level0, grid, _, _ = _ours(run_dir, sid)
        # finetune/datasets/slide_datatset.py: root_path/<slide_id>.h5, 'features' and 'coords' as they are
        data, _, per = _h5(run_dir / "export" / "prov-gigapath" / f"{sid}.h5")
        np.testing.assert_array_equal(data["features"], feats)
        np.testing.assert_array_equal(data["coords"], grid)
        assert (data["coords"] % 256 == 0).all() and per["coords"]["unit"] == "grid px at 0.5 um/px"
        assert sid == "OS-1-detail" or not np.array_equal(data["coords"], level0)  # 256 vs 563.6 per tile
    data, _, _ = _h5(run_dir / "export" / "prov-gigapath" / "OS-2-ndpi.h5")
    # gigapath/slide_encoder.py coords_to_pos: floor(coords / 256) -> consecutive cells 0, 1, 2
    assert sorted(set((data["coords"] // 256).ravel().tolist())) == [0, 1, 2]


def test_anndata_per_slide_and_cohort(run_dir):
    ad = pytest.importorskip("anndata")
    export_run(run_dir, "anndata")
    export_run(run_dir, "anndata", run_dir / "cohort", cohort=True)
    cohort = ad.read_h5ad(run_dir / "cohort" / "cohort.h5ad")
    n = 0
    for sid in IDS:
        feats, level0, grid, mpp, _ = _ours(run_dir, sid)
        a = ad.read_h5ad(run_dir / "export" / "anndata" / f"{sid}.h5ad")
        assert a.X.dtype == np.float32
        np.testing.assert_array_equal(a.X, feats)
        np.testing.assert_array_equal(a.obs[["x", "y"]].to_numpy(), level0)
        np.testing.assert_array_equal(a.obs[["grid_x", "grid_y"]].to_numpy(), grid)
        np.testing.assert_allclose(a.obs[["x_um", "y_um"]].to_numpy(), level0 * mpp, rtol=1e-4)
        np.testing.assert_array_equal(a.obsm["spatial"], level0)
        meta = a.uns["slides"][sid]
        assert meta["level0_mpp_x"] == pytest.approx(mpp) and meta["tile_size"] == 256
        assert meta["tile_encoder"] == "dinov2_vit" and meta["weights_source"] == "random"
        assert meta["tile_size_level0"] == pytest.approx(256 * 0.5 / mpp)
        part = cohort[cohort.obs["slide_id"] == sid]
        np.testing.assert_array_equal(part.X, feats)
        np.testing.assert_array_equal(part.obsm["spatial"], level0)
        n += len(feats)
    assert cohort.n_obs == n and sorted(cohort.obs["slide_id"].cat.categories) == IDS
    assert sorted(cohort.uns["slides"]) == IDS and not (run_dir / "cohort" / "OS-1-detail.h5ad").exists()


def test_v1_and_v2_runs_export_the_same(run_copy, tmp_path):
    outs = {}
    for version in (1, 2):
        for sid in IDS:
            rewrite(run_copy / sid, version)
        for fmt in ("trident", "stamp", "prov-gigapath"):
            export_run(run_copy, fmt, tmp_path / f"v{version}" / fmt)
        outs[version] = {p.relative_to(tmp_path / f"v{version}"): _h5(p)[0]
                         for p in sorted((tmp_path / f"v{version}").rglob("*.h5"))}
    assert outs[1].keys() == outs[2].keys() and len(outs[1]) == 5 * len(IDS)  # trident: 3 files
    for rel, data in outs[1].items():
        for k, v in data.items():
            np.testing.assert_array_equal(v, outs[2][rel][k], err_msg=f"{rel}:{k}")


def test_slide_without_level0_coords_is_refused_where_needed(run_copy):
    rewrite(run_copy / "OS-1-detail", 1, drop_level0=True)  # grid px only
    res = export_run(run_copy, "clam")
    assert res.exported == ["OS-2-ndpi"]
    refused = {r["slide_id"]: r for r in res.not_exported}
    assert refused["OS-1-detail"]["status"] == "refused"
    assert "no level-0 coordinates" in refused["OS-1-detail"]["reason"]
    assert refused["corrupt"]["status"] == "failed"
    assert not (run_copy / "export" / "clam" / "h5_files" / "OS-1-detail.h5").exists()
    assert sorted(export_run(run_copy, "prov-gigapath").exported) == IDS  # grid px are all it needs
    assert main(["export", str(run_copy), "--format", "trident"]) == 1  # a slide refused: exit 1
    assert main(["export", str(run_copy), "--format", "stamp"]) == 0  # only the run's own failure left out


def test_cli_summary_listing_and_errors(run_dir, tmp_path, capsys):
    dest = tmp_path / "pg"
    assert main(["export", str(run_dir), "--format", "prov-gigapath", "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"exported 2 slide(s) as prov-gigapath -> {dest}" in out and "corrupt: failed" in out
    info = json.loads((dest / "export.json").read_text())
    assert info["exported"] == IDS and info["not_exported"][0]["slide_id"] == "corrupt"
    assert "no reader could open it" in info["not_exported"][0]["reason"]
    assert sorted(p.name for p in dest.iterdir()) == ["OS-1-detail.h5", "OS-2-ndpi.h5", "export.json"]
    assert not list(dest.rglob(".gigapath-tmp-*"))
    assert main(["export", str(run_dir), "--format", "clam", "--cohort"]) == 2
    assert "export.cohort: --cohort applies to --format anndata only" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--format", "trident", "--encoder", "../up"]) == 2
    assert "export.encoder: '../up' is not a plain name" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nope"), "--format", "stamp"]) == 2
    assert "export.out:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse choices
        main(["export", str(run_dir), "--format", "qupath"])
    assert exc.value.code == 2


def test_anndata_missing_names_the_extra(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "anndata", None)  # import anndata -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'gigapath-core\[anndata\]'"):
        export_run(run_dir, "anndata", run_dir / "never")
    assert not (run_dir / "never").exists()


def test_unreadable_slide_file_fails_that_slide_only(run_copy):
    (run_copy / "OS-2-ndpi" / "tiles.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    res = export_run(run_copy, "stamp")
    assert res.exported == ["OS-1-detail"]
    reason = {r["slide_id"]: r["reason"] for r in res.not_exported}["OS-2-ndpi"]
    assert "tiles.h5: cannot read" in reason
    assert json.loads((run_copy / "export" / "stamp" / "export.json").read_text())["exported"] == ["OS-1-detail"]


def test_ecosystem_names_of_known_encoders():
    from gigapath_core.export._source import SlideFeatures
    from gigapath_core.export._write import encoder_name, slide_encoder_name

    def sf(tile, weights, slide="", slide_weights=""):
        return SlideFeatures("s", np.zeros((0, 2), np.float32), None, np.zeros((0, 2), np.int64), (0.25, 0.25), 256,
                             0.5, tile, weights, 0, None, [], "", slide_encoder=slide,
                             slide_encoder_weights=slide_weights)

    gp_tile = sf("dinov2_vit", "hf_hub:prov-gigapath/prov-gigapath/pytorch_model.bin", "longnet",
                 "/w/prov-gigapath/slide_encoder.pth")
    # TRIDENT enc_name / STAMP ExtractorName of Prov-GigaPath: 'gigapath' (trident/patch_encoder_models/load.py)
    assert encoder_name(gp_tile) == "gigapath" and slide_encoder_name(gp_tile, "gigapath") == "gigapath"
    assert encoder_name(sf("dinov2_vit", "hf_hub:timm/vit_small_patch14_dinov2.lvd142m")) == "dinov2_vit"
    assert encoder_name(gp_tile, "uni_v1") == "uni_v1"
    assert slide_encoder_name(sf("ctranspath", "x", "mean"), "ctranspath") == "mean-ctranspath"
    assert slide_encoder_name(sf("dinov2_vit", "random", "longnet", "random"), "dinov2_vit") == "longnet"
