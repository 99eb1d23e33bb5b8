"""read_tile_features on files laid out exactly as each tool writes them, from a 0.25 µm/px (40x) slide's
geometry: neighbouring tiles must come out as neighbouring grid cells (0, 1, 2..., never 0, 2, 4...)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import gigapath_core as gp
from gigapath_core.errors import ConfigError, FeatureFileError, NonFiniteError
from gigapath_core.interop import FORMAT_VERSION, read_tile_features
from gigapath_core.store import read_h5

ROOT = Path(__file__).resolve().parent.parent
#: a 3 x 4 block of tiles (cells), row-major, as every tiler here orders them
CELLS = np.array([(c, r) for r in range(3) for c in range(4)], dtype=np.int64)
N, D = len(CELLS), 6


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, D)).astype(np.float32)


def _assert_consecutive(tf, origin=(0, 0)):
    assert tf.grid_coords.dtype == np.int64 and tf.grid_coords.shape == (N, 2)
    np.testing.assert_array_equal(tf.grid_coords, (CELLS + np.array(origin)) * 256)


def write_trident(path: Path, level0_step: int = 512, level0_mag: int = 40, feats=None) -> np.ndarray:
    """TRIDENT ``features_<encoder>/<slide>.h5``: trident/wsi_objects/WSI.py extract_patch_features saves
    ``features`` and ``coords`` (level-0 px, int64) with the coords attributes of trident/IO.py coords_to_h5."""
    coords = CELLS * level0_step
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=_features() if feats is None else feats)
        f["features"].attrs["name"] = path.stem
        c = f.create_dataset("coords", data=coords.astype(np.int64))
        c.attrs.update({"patch_size": 256, "patch_size_level0": 256 * level0_mag // 20,
                        "level0_magnification": level0_mag, "target_magnification": 20, "overlap": 0,
                        "name": path.stem, "savetodir": str(path.parent), "level0_width": 4096,
                        "level0_height": 3072})
    return coords


def write_clam(folder: Path, sid: str, origin: int = 1000) -> np.ndarray:
    """CLAM extract_features_fp.py: ``h5_files/<slide>.h5`` with ``features`` float32 and ``coords`` int32 level-0
    px and no attributes (utils/file_utils.py save_hdf5 with attr_dict=None, chunked, resizable), plus
    ``pt_files/<slide>.pt`` = torch.save(features). Grids start at each contour's bounding box
    (wsi_core/WholeSlideImage.py process_contour), here at x = y = ``origin``."""
    coords = (origin + CELLS * 512).astype(np.int32)
    feats = _features()
    (folder / "h5_files").mkdir(parents=True, exist_ok=True)
    (folder / "pt_files").mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "h5_files" / f"{sid}.h5", "w") as f:
        for key, val in {"features": feats, "coords": coords}.items():
            f.create_dataset(key, data=val, chunks=(32,) + val.shape[1:], maxshape=(None,) + val.shape[1:])
    torch.save(torch.from_numpy(feats), folder / "pt_files" / f"{sid}.pt")
    return coords


def test_trident_40x_file_gives_consecutive_cells(tmp_path):
    path = tmp_path / "features_uni_v1" / "slide.h5"
    coords = write_trident(path)
    tf = read_tile_features(path)
    assert tf.source_format == "trident" and tf.level0_mpp == 0.25 and tf.tile_size == 256
    _assert_consecutive(tf)
    np.testing.assert_array_equal(tf.coords, coords)
    assert tf.features.dtype == np.float32 and tf.features.shape == (N, D)


def test_trident_file_of_a_0_2271_slide_uses_its_own_tile_step(tmp_path):
    # TRIDENT rounds 0.2271 µm/px to "40x" (WSI._fetch_magnification) and tiles it at a 512-px step; the true
    # mpp given by the user must not break the grid (it would give cells 0, 1, 2, 3, 4, 4, 5...)
    path = tmp_path / "features_uni_v1" / "slide.h5"
    write_trident(path)
    tf = read_tile_features(path, level0_mpp=0.2271)
    _assert_consecutive(tf)
    assert tf.level0_mpp == 0.2271


def test_clam_h5_and_pt_need_level0_mpp(tmp_path):
    coords = write_clam(tmp_path, "s1")
    h5 = tmp_path / "h5_files" / "s1.h5"
    with pytest.raises(ConfigError) as err:
        read_tile_features(h5, key_prefix="data.")
    msg = str(err.value)
    assert msg.startswith("data.level0_mpp: ") and str(h5) in msg and "patch_size" in msg and "downsample" in msg
    tf = read_tile_features(h5, level0_mpp=0.25)
    assert tf.source_format == "clam"
    _assert_consecutive(tf, origin=(2, 2))  # 1000 level-0 px = 1.95 cells -> cell 2
    np.testing.assert_array_equal(tf.coords, coords)
    pt = read_tile_features(tmp_path / "pt_files" / "s1.pt", level0_mpp=0.25)
    np.testing.assert_array_equal(pt.features, tf.features)
    np.testing.assert_array_equal(pt.grid_coords, tf.grid_coords)
    assert pt.path.suffix == ".pt"


def test_clam_patch_attributes_give_the_step(tmp_path):
    # create_patches_fp.py patch files: patch_size at patch_level, downsample of that level
    path = tmp_path / "h5_files" / "s.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f["features"] = _features()
        c = f.create_dataset("coords", data=CELLS * 512)
        c.attrs.update({"patch_size": 256, "patch_level": 1, "downsample": (2.0, 2.0), "name": "s"})
    _assert_consecutive(read_tile_features(path))


def test_stamp_file_in_um(tmp_path):
    """STAMP src/stamp/preprocessing/__init__.py: ``feats`` float16, ``coords`` float µm, root attrs."""
    path = tmp_path / "slide.h5"
    level0 = CELLS * 512
    with h5py.File(path, "w") as f:
        f["coords"] = (level0 * 0.25).astype(np.float32)
        f["feats"] = _features().astype(np.float16)
        f.attrs.update({"stamp_version": "2.2.0", "extractor": "ctranspath", "unit": "um", "tile_size_um": 128.0,
                        "tile_size_px": 224, "code_hash": "abc", "feat_type": "tile"})
    tf = read_tile_features(path)
    assert tf.source_format == "stamp" and tf.coords is None and tf.features.dtype == np.float32
    _assert_consecutive(tf)
    np.testing.assert_array_equal(read_tile_features(path, level0_mpp=0.25).coords, level0)


def test_prov_gigapath_grid_px_and_level0_refused(tmp_path):
    path = tmp_path / "slide.h5"  # finetune/datasets/slide_datatset.py reads 'features' and 'coords' (grid px)
    with h5py.File(path, "w") as f:
        f["features"] = _features()
        f["coords"] = (CELLS * 256).astype(np.float32)
    tf = read_tile_features(path)
    assert tf.source_format == "prov-gigapath" and tf.coords is None
    _assert_consecutive(tf)
    with h5py.File(path, "w") as f:  # level-0 px of a 40x slide where grid px belong
        f["features"] = _features()
        f["coords"] = CELLS * 512
    with pytest.raises(ConfigError, match=r"data\.level0_mpp: .*slide\.h5: .* level-0 px of a 0\.25 µm/px slide"):
        read_tile_features(path, key_prefix="data.")
    tf = read_tile_features(path, coords_unit="level0_px", level0_mpp=0.25)
    _assert_consecutive(tf)
    np.testing.assert_array_equal(tf.coords, CELLS * 512)


def test_version_1_file_converted_on_read(tmp_path):
    path = tmp_path / "s" / "tile_embeddings.h5"
    path.parent.mkdir()
    level0 = np.rint(CELLS * 256 * 0.5 / 0.2271).astype(np.int64)
    with h5py.File(path, "w") as f:  # the layout before issue #17
        f["features"] = _features()
        f["coords"] = CELLS * 256
        f["coords_level0"] = level0
        f.attrs["tile_encoder"] = "x"
    tf = read_tile_features(path)
    assert tf.source_format == "gigapath" and tf.attrs["format_version"] == 1
    _assert_consecutive(tf)
    np.testing.assert_array_equal(tf.coords, level0)


def test_bad_values_are_refused(tmp_path):
    path = tmp_path / "slide.h5"
    feats = _features()
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = CELLS * 256 + 7
    with pytest.raises(ConfigError, match="not a multiple of tile_size 256"):
        read_tile_features(path)
    feats[5, 1] = np.inf
    with h5py.File(path, "w") as f:
        f["features"] = feats
        f["coords"] = CELLS * 256
    with pytest.raises(NonFiniteError, match="non-finite \\(NaN/Inf\\) for 1 of .* tiles, first tile 5"):
        read_tile_features(path)
    with pytest.raises(FeatureFileError, match="not found"):
        read_tile_features(tmp_path / "nope.h5")


def test_trident_layout_written_by_us_reads_as_trident(tmp_path):
    from gigapath_core.interop import coords_attrs
    from gigapath_core.store import write_h5

    path = tmp_path / "features_x" / "s.h5"  # an export in TRIDENT's layout carries our format_version too
    write_h5(path, {"features": _features(), "coords": CELLS * 512},
             dataset_attrs={"coords": coords_attrs(0.25, name="s")})
    tf = read_tile_features(path)
    assert tf.source_format == "trident" and tf.attrs["format_version"] == FORMAT_VERSION
    _assert_consecutive(tf)


def test_feature_table_csv_with_per_slide_level0_mpp(tmp_path):
    from gigapath_core.interop import FeatureLocator

    write_clam(tmp_path / "clam", "a")
    write_clam(tmp_path / "clam", "b", origin=0)
    (tmp_path / "table.csv").write_text("slide_id,features_path,level0_mpp\n"
                                        "a,clam/h5_files/a.h5,0.25\nb,clam/pt_files/b.pt,0.5\n")
    loc = FeatureLocator([str(tmp_path / "table.csv")], "data.embeddings")
    a, b = loc.find("a"), loc.find("b")
    assert a.level0_mpp == 0.25 and b.path.suffix == ".pt" and loc.find("c") is None
    _assert_consecutive(read_tile_features(a.path, level0_mpp=a.level0_mpp), origin=(2, 2))
    with pytest.raises(ConfigError, match=r"^x\.level0_mpp: .*b\.h5: every tile is 2 grid cells"):
        read_tile_features(b.path, level0_mpp=b.level0_mpp, key_prefix="x.")  # 0.5 is wrong for a 40x slide
    (tmp_path / "bad.csv").write_text("slide_id,features_path\na,nope.h5\n")
    with pytest.raises(ConfigError, match=r"^data\.embeddings\[row 2\]\.features_path: file not found"):
        FeatureLocator([str(tmp_path / "bad.csv")], "data.embeddings")
    folder = FeatureLocator([str(tmp_path / "clam")], "k").all()
    assert sorted(folder) == ["a", "b"] and folder["a"].path.parent.name == "h5_files"


# ------------------------------------------------------------------------------------- jobs on them
def _trident_cohort(root: Path, n_patients: int = 8) -> Path:
    folder = root / "trident" / "features_uni_v1"
    rows = []
    for p in range(n_patients):
        feats = _features(p)
        feats[:4, 0] += 3.0 * (p % 2)
        write_trident(folder / f"S{p}.h5", feats=feats)
        rows.append({"slide_id": f"S{p}", "patient_id": f"P{p}", "label": ["neg", "pos"][p % 2]})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return folder


def test_finetune_reads_a_trident_folder_as_consecutive_cells(tmp_path):
    from gigapath_core.finetune.config import DataConfig
    from gigapath_core.finetune.data import load_data, load_slide

    folder = _trident_cohort(tmp_path)
    data = load_data(DataConfig(embeddings=[str(folder)], labels=str(tmp_path / "labels.csv"),
                                label_columns=["label"], task="binary"))
    assert len(data.slides) == 8 and data.provenance["tile_encoder"] == ["uni_v1"]
    feats, coords = load_slide(data.slides["S3"])
    assert feats.shape == (1, N, D)
    np.testing.assert_array_equal(coords[0].numpy(), CELLS * 256)
    cfg = {"job": "finetune", "output": str(tmp_path / "out"),
           "data": {"embeddings": str(folder), "labels": str(tmp_path / "labels.csv"), "label_columns": "label",
                    "task": "binary"},
           "folds": {"k": 2, "seed": 0},
           "model": {"head": {"name": "abmil", "params": {"attn_dim": 4, "dropout": 0.0}}},
           "train": {"epochs": 1, "grad_accum": 2, "lr": 0.01, "device": "cpu", "progress": False}}
    assert gp.run(cfg) == 0


def test_finetune_refuses_level0_coords_without_units(tmp_path):
    folder = tmp_path / "emb"
    for p in range(4):  # prov-gigapath-looking files holding level-0 px of a 40x slide
        (folder).mkdir(exist_ok=True)
        with h5py.File(folder / f"S{p}.h5", "w") as f:
            f["features"] = _features(p)
            f["coords"] = CELLS * 512
    (tmp_path / "labels.csv").write_text("slide_id,patient_id,label\n" +
                                         "".join(f"S{p},P{p},{'ab'[p % 2]}\n" for p in range(4)))
    cfg = {"job": "finetune", "output": str(tmp_path / "out"),
           "data": {"embeddings": str(folder), "labels": str(tmp_path / "labels.csv"), "label_columns": "label",
                    "task": "binary"},
           "train": {"epochs": 1, "device": "cpu", "progress": False}}
    with pytest.raises(ConfigError, match=r"data\.level0_mpp: .*S0\.h5.*level-0 px of a 0\.25 µm/px slide"):
        gp.run(cfg)


def test_embed_job_on_foreign_features(tmp_path):
    folder = _trident_cohort(tmp_path, n_patients=2)
    out = tmp_path / "out"
    cfg = {"inputs": {"features": str(folder)}, "slide_encoder": {"name": "mean", "params": {"in_dim": D}}}
    assert gp.run(cfg, out=str(out)) == 0
    for sid in ("S0", "S1"):
        emb, attrs = read_h5(out / sid / "slide_embedding.h5")
        feats = read_tile_features(folder / f"{sid}.h5").features
        np.testing.assert_allclose(emb["embedding"], feats.mean(0), rtol=1e-5, atol=1e-6)
        assert attrs["format_version"] == FORMAT_VERSION and attrs["tile_features_format"] == "trident"
    with open(out / "manifest.csv") as f:
        rows = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert rows["S0"]["status"] == "ok" and rows["S0"]["n_tiles"] == str(N)
    with pytest.raises(ConfigError, match="^tile_encoder: inputs.features already holds tile embeddings"):
        gp.run({**cfg, "tile_encoder": {"name": "dinov2-vits14"}}, out=str(out))
    write_clam(tmp_path / "clam", "C")  # no units in the file: the embed job's key for level-0 mpp is inputs.mpp
    clam = {"inputs": {"features": str(tmp_path / "clam")}, "slide_encoder": cfg["slide_encoder"]}
    assert gp.run(clam, out=str(tmp_path / "out2")) == 1  # that file fails alone, naming the key that fixes it
    with open(tmp_path / "out2" / "manifest.csv") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "failed" and row["error_type"] == "FeatureFileError"
    assert re.search(r"C\.h5: inputs\.mpp: .*C\.h5: .*give it with inputs\.mpp$", row["reason"]), row["reason"]
    clam["inputs"]["mpp"] = 0.25
    assert gp.run(clam, out=str(tmp_path / "out2")) == 0
    assert read_h5(tmp_path / "out2" / "C" / "slide_embedding.h5")[1]["tile_features_format"] == "clam"


# ------------------------------------------------------------------------------------- our writers
TINY_VIT = {"name": "dinov2_vit", "weights": "random", "num_workers": 0, "batch_size": 64,
            "params": {"model_name": "vit_small_patch14_dinov2", "model_kwargs": {"depth": 1}}}


def test_real_run_writes_format_version_2_with_both_units(tmp_path):
    slide = ROOT / "examples" / "data" / "OS-2-ndpi.ome.tif"  # ~0.2265 µm/px ("40x")
    cfg = {"inputs": {"slides": [str(slide)]}, "tile_encoder": TINY_VIT,
           "tiler": {"name": "otsu", "params": {"min_occupancy": 0.1}},  # 8 tiles
           "slide_encoder": {"name": "mean", "params": {"in_dim": 384}}}
    assert gp.run(cfg, out=str(tmp_path)) == 0
    path = tmp_path / "OS-2-ndpi" / "tile_embeddings.h5"
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2 and "coords_level0" not in f
        coords, grid = f["coords"][()], f["grid_coords"][()]
        ca, ga = dict(f["coords"].attrs), dict(f["grid_coords"].attrs)
    with h5py.File(tmp_path / "OS-2-ndpi" / "tiles.h5", "r") as f:
        assert f.attrs["format_version"] == 2 and dict(f["coords"].attrs)["unit"] == "level-0 px"
    mpp = ca["level0_mpp"]
    assert 0.22 < mpp < 0.23 and len(coords) > 1 and coords.dtype == np.int64
    assert not np.array_equal(coords, grid)
    np.testing.assert_allclose(coords, grid * 0.5 / mpp, atol=1.0)  # level-0 = grid px * 0.5 / mpp
    assert (grid % 256 == 0).all()
    assert ca["unit"] == "level-0 px" and ca["target_mpp"] == 0.5 and ca["patch_size"] == 256
    assert ca["patch_size_level0"] == int(256 * 0.5 / mpp) and ca["overlap"] == 0  # floored (units.patch_size_level0)
    assert ca["tile_size_level0"] == pytest.approx(256 * 0.5 / mpp)
    # TRIDENT's slide encoders place a tile at floor(coords / patch_size_level0): that is its grid cell
    np.testing.assert_array_equal(coords // ca["patch_size_level0"], grid // 256)
    assert ca["level0_magnification"] == pytest.approx(10 / mpp) and ca["target_magnification"] == 20
    assert "patch_level" in ca and ca["name"] == "OS-2-ndpi"
    assert ga["unit"] == "grid px" and ga["tile_size"] == 256 and ga["target_mpp"] == 0.5
    tf = read_tile_features(path)
    np.testing.assert_array_equal(tf.grid_coords, grid)
    np.testing.assert_array_equal(tf.coords, coords)
    assert tf.level0_mpp == mpp and tf.source_format == "gigapath"
    # TRIDENT's patcher reads round(patch_size * (10 / target_mag) / (10 / level0_mag)) level-0 px per tile:
    # the level-0 tile side our tiler read (trident/wsi_objects/WSIPatcher.py)
    side = round(ca["patch_size"] * (10 / ca["target_magnification"]) / (10 / ca["level0_magnification"]))
    assert side == round(256 * 0.5 / mpp)


def test_pretraining_reads_a_clam_folder_with_its_unit_key(tmp_path):
    from gigapath_core.pretrain.data import embedding_files, load_slide_embeddings

    write_clam(tmp_path, "X")
    files = embedding_files(str(tmp_path))
    assert list(files) == ["X"]
    with pytest.raises(ConfigError, match=r"^embeddings\.level0_mpp: .*X\.h5"):
        load_slide_embeddings(files)
    slides = load_slide_embeddings(files, level0_mpp=0.25)
    np.testing.assert_array_equal(slides["X"]["coords"], (CELLS + 2) * 256)


def test_our_v2_file_checks_grid_against_level0(tmp_path):
    from gigapath_core.interop import coords_attrs, grid_coords_attrs
    from gigapath_core.store import write_h5

    specks = np.array([[0, 0], [2, 0], [4, 0], [6, 0]])  # scattered specks two cells apart: legitimate here
    path = tmp_path / "s" / "tile_embeddings.h5"
    level0 = np.rint(specks * 256 * 0.5 / 0.2271).astype(np.int64)
    write_h5(path, {"features": _features()[:4], "coords": level0, "grid_coords": specks * 256},
             dataset_attrs={"coords": coords_attrs(0.2271), "grid_coords": grid_coords_attrs()})
    tf = read_tile_features(path)
    np.testing.assert_array_equal(tf.grid_coords, specks * 256)
    assert tf.level0_mpp == 0.2271
    write_h5(path, {"features": _features()[:4], "coords": level0 * 2, "grid_coords": specks * 256},
             dataset_attrs={"coords": coords_attrs(0.2271)})
    with pytest.raises(ConfigError, match="does not match its level-0 coords"):
        read_tile_features(path)
