"""The tile-embedding stage on the bundled real slide (CMU-1-Small-Region, CC0) with the ViT-S/14 preset:
row order follows the tiler's coordinates, workers and batching do not change values, errors name the tile,
and ``weights: random`` is recorded in the output and the log."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch

import gigapath_core as gp
from gigapath_core.errors import SlideReadError
from gigapath_core.stages.tile_embedding import TileDataset, autocast_context, embed_tiles
from gigapath_core.stages.tiling import open_slide
from gigapath_core.store import read_h5

N_TILES = 8  # tiles used for the ordering tests (a subset keeps the test short on 2 cores)


@pytest.fixture(scope="module")
def setup(example_slide):
    """Otsu grid of the example slide and the ``dinov2-vits14`` preset (random, seeded weights)."""
    tiler = gp.build("tiler", "otsu")
    with open_slide(str(example_slide), ["openslide"]) as wsi:
        grid = tiler.tile(wsi)
    torch.manual_seed(0)
    enc = gp.build("tile_encoder", "dinov2-vits14", weights="random")
    return tiler, grid, enc


def dataset(example_slide, tiler, grid, coords, enc):
    # the encoder's bound method, as the pipeline passes it (workers get its small tile_transform instead)
    return TileDataset(str(example_slide), "openslide", tiler, coords, grid.level, grid.read_size, grid.tile_size,
                       enc.transform)


def test_rows_follow_tiler_coords(setup, example_slide):
    tiler, grid, enc = setup
    assert len(grid) >= N_TILES
    coords = grid.coords[:N_TILES]
    ds = dataset(example_slide, tiler, grid, coords, enc)
    assert ds.transform is enc.tile_transform and len(pickle.dumps(ds)) < 100_000  # workers never get the model
    feats = embed_tiles(enc, ds, batch_size=4, num_workers=2)
    assert feats.shape == (N_TILES, 384) and feats.dtype == np.float32
    # independent of the stage: row i is the encoder applied to the tile the tiler reads at coords[i]
    with open_slide(str(example_slide), ["openslide"]) as wsi, torch.inference_mode():
        for i in (0, N_TILES - 1):
            tile = tiler.read_tile(wsi, coords[i], grid.level, grid.read_size, grid.tile_size)
            direct = enc(enc.transform(tile)[None])[0].numpy()
            np.testing.assert_allclose(feats[i], direct, rtol=1e-4, atol=1e-4)
    # shuffled input order (other batch composition, 0 workers): permuted rows, same values
    perm = np.random.default_rng(0).permutation(N_TILES)
    shuffled = embed_tiles(enc, dataset(example_slide, tiler, grid, coords[perm], enc), batch_size=3, num_workers=0)
    np.testing.assert_allclose(shuffled, feats[perm], rtol=1e-4, atol=1e-4)
    assert not np.allclose(feats[0], feats[1])  # distinct tiles, distinct rows (the check above is not vacuous)


class FailingDataset(TileDataset):
    def read(self, i):
        if i == 2:
            raise OSError("Bogus marker length")
        return super().read(i)


def test_unreadable_tile_fails_the_slide_with_its_position(setup, example_slide):
    tiler, grid, enc = setup
    ds = FailingDataset(str(example_slide), "openslide", tiler, grid.coords[:4], grid.level, grid.read_size,
                        grid.tile_size, enc.transform)
    x, y = grid.coords[2]
    with pytest.raises(SlideReadError, match=rf"cannot read tile 2 at level-0 \({x}, {y}\): OSError: Bogus marker"):
        embed_tiles(enc, ds, batch_size=2, num_workers=0)


def test_channels_last_cnn_same_values(setup, example_slide):
    """CTransPath asks for channels-last; the stage's result equals a plain forward of the same tiles."""
    tiler, grid, _ = setup
    cnn = gp.build("tile_encoder", "ctranspath", weights="random")
    assert cnn.channels_last
    ds = TileDataset(str(example_slide), "openslide", tiler, grid.coords[:3], grid.level, grid.read_size,
                     grid.tile_size, cnn.transform)
    with torch.inference_mode():
        plain = cnn(torch.stack([cnn.transform(ds.read(i)) for i in range(3)])).numpy()
    feats = embed_tiles(cnn, ds, batch_size=3, num_workers=0)
    np.testing.assert_allclose(feats, plain, rtol=1e-4, atol=1e-4)


def test_autocast_defaults():
    assert type(autocast_context(torch.device("cpu"), "auto")).__name__ == "nullcontext"  # fp32 on CPU
    ctx = autocast_context(torch.device("cpu"), "bf16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_pipeline_writes_tile_order_and_records_random_weights(example_slide, tmp_path, caplog, capsys):
    cfg = {"inputs": {"slides": [str(example_slide)]}, "readers": ["openslide"],
           "tiler": {"name": "otsu", "params": {"min_occupancy": 0.99}},  # 13 of the 49 tiles: a short test
           "tile_encoder": {"name": "dinov2-vits14", "weights": "random", "batch_size": 16, "num_workers": 1},
           "slide_encoder": {"name": "mean", "params": {"in_dim": 384}}}
    with caplog.at_level(logging.WARNING, logger="gigapath"):
        assert gp.run(cfg, out=str(tmp_path)) == 0
    d = tmp_path / "CMU-1-Small-Region"
    tiles, _ = read_h5(d / "tiles.h5")
    emb, attrs = read_h5(d / "tile_embeddings.h5")
    n = len(tiles["coords"])
    assert n >= 10 and emb["features"].shape == (n, 384) and emb["features"].dtype == np.float32
    np.testing.assert_array_equal(emb["grid_coords"], tiles["grid_coords"])  # rows in the tiler's (row-major) order
    np.testing.assert_array_equal(emb["coords"], tiles["coords"])
    assert attrs["weights_source"] == "random" and attrs["tile_encoder"] == "dinov2-vits14"
    # said once, by the run's model summary line (rich console: stderr), not also as a log warning
    assert "tile encoder: dinov2_vit with RANDOM weights (not pretrained)" in capsys.readouterr().err
    assert "weights: random (not pretrained)" not in caplog.text


class _ThreadRecordingDataset(torch.utils.data.Dataset):
    """Items (3, 2, 2) float32 of value i; records torch's thread count while each item is made."""

    def __init__(self, n: int):
        self.n, self.threads = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.threads.append(torch.get_num_threads())
        return torch.full((3, 2, 2), float(i)), i, ""


class _RecordingEncoder(torch.nn.Module):
    embed_dim = 1

    def __init__(self):
        super().__init__()
        self.threads = []

    def forward(self, images):
        self.threads.append(torch.get_num_threads())
        return images.mean((1, 2, 3))[:, None]


def test_in_process_tiles_are_made_on_one_thread_and_the_encoder_keeps_its_threads():
    """num_workers 0: decoding/transforms run on 1 torch thread (benchmarks/input_path.py: 3-5x faster under
    load), the encoder on the caller's count, which is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ds, enc = _ThreadRecordingDataset(10), _RecordingEncoder()
        out = embed_tiles(enc, ds, batch_size=4, num_workers=0, device="cpu", precision="fp32")
        np.testing.assert_array_equal(out[:, 0], np.arange(10, dtype=np.float32))
        assert ds.threads == [1] * 10 and enc.threads == [2, 2, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
