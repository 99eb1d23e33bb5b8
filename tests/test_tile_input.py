"""The tile transform split into a per-tile uint8 step and a per-batch ToTensor + Normalize
(gigapath_core/stages/tile_input.py) gives the torchvision transform's numbers bit for bit on real tiles, and
transforms that do not split still run per tile."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import gigapath_core as gp
from gigapath_core.stages.tile_embedding import TileDataset, embed_tiles
from gigapath_core.stages.tile_input import BatchNormalize, ReusedBuffer, TransformSplit, split_transform
from gigapath_core.stages.tiling import open_slide
from gigapath_plugins.tile_encoders._common import HALF, IMAGENET_MEAN, IMAGENET_STD, TileTransform

# (resize, crop, mean, std, interpolation) as the bundled encoders build them
CONFIGS = [(None, None, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),  # no resize: the 256-px tile itself
           (256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),  # Prov-GigaPath, UNI, Virchow
           (224, 224, HALF, HALF, "bilinear"),
           (224, 224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "bicubic")]  # H-optimus


def torchvision_reference(resize, crop, mean, std, interpolation):
    """The published transform written out with torchvision alone (independent of TileTransform)."""
    mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
    steps = ([T.Resize(resize, interpolation=mode)] if resize else []) + ([T.CenterCrop(crop)] if crop else [])
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


@pytest.fixture(scope="module")
def cmu_tiles(example_slide):
    """(path, tiler, grid) of the bundled CMU-1-Small-Region slide (49 tiles of 256 px at level 0)."""
    tiler = gp.build("tiler", "otsu")
    with open_slide(str(example_slide), ["openslide"]) as wsi:
        grid = tiler.tile(wsi)
        tiles = [tiler.read_tile(wsi, c, grid.level, grid.read_size, grid.tile_size) for c in grid.coords]
    return str(example_slide), tiler, grid, tiles


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[4]}-{c[2][0]}")
def test_split_equals_the_torchvision_transform_bit_for_bit(cmu_tiles, config):
    *_, tiles = cmu_tiles
    tt = TileTransform(*config)
    split = split_transform(tt)
    assert isinstance(split, TransformSplit) and (split.pixels is None) == (config[0] is None)
    pixels = [t if split.pixels is None else split.pixels(t) for t in tiles]
    assert all(p.dtype == np.uint8 and p.shape[2] == 3 for p in pixels)
    batch = torch.from_numpy(np.stack(pixels))
    got = split.normalize(batch)
    ref = torch.stack([torchvision_reference(*config)(Image.fromarray(t)) for t in tiles])
    assert got.shape == ref.shape == (len(tiles), 3, config[1] or 256, config[1] or 256)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, ref), f"max-abs diff {(got - ref).abs().max().item():g}"
    cl = split.normalize(batch, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, ref)
    assert ref.std() > 0.1  # real tissue, not a constant image


def test_dataset_items_are_uint8_and_the_stage_gives_the_per_tile_numbers(cmu_tiles):
    path, tiler, grid, tiles = cmu_tiles
    tt = TileTransform(256, 224, IMAGENET_MEAN, IMAGENET_STD)
    coords = grid.coords[:12]
    ds = TileDataset(path, "openslide", tiler, coords, grid.level, grid.read_size, grid.tile_size, tt)
    image, i, err = ds[3]
    assert (i, err) == (3, "") and image.dtype == torch.uint8 and image.shape == (224, 224, 3)
    assert torch.equal(ds.model_input(3), tt(tiles[3]))
    assert isinstance(pickle.loads(pickle.dumps(ds)).batch_transform, BatchNormalize)

    class Stats(torch.nn.Module):
        embed_dim = 6

        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)

    enc = Stats()
    with torch.inference_mode():
        direct = enc(torch.stack([tt(t) for t in tiles[:12]])).numpy()
    for workers in (0, 2):
        out = embed_tiles(enc, ds, batch_size=5, num_workers=workers, device="cpu", precision="fp32")
        np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out[:, 3:], direct[:, 3:])  # the max of each channel: exactly equal


def test_transform_without_split_runs_per_tile(cmu_tiles):
    path, tiler, grid, tiles = cmu_tiles

    def custom(tile):  # any (H, W, 3) uint8 -> (3, h, w) float32 function
        return torch.from_numpy(tile[::2, ::2].astype(np.float32)).permute(2, 0, 1) / 100.0

    ds = TileDataset(path, "openslide", tiler, grid.coords[:4], grid.level, grid.read_size, grid.tile_size, custom)
    assert split_transform(custom) is None and ds.batch_transform is None
    image = ds[1][0]
    assert image.dtype == torch.float32 and torch.equal(image, custom(tiles[1]))
    assert torch.equal(ds.model_input(1), image)

    class Mean(torch.nn.Module):
        embed_dim = 3

        def forward(self, x):
            return x.mean((2, 3))

    out = embed_tiles(Mean(), ds, batch_size=3, num_workers=0, device="cpu", precision="fp32")
    np.testing.assert_allclose(out, np.stack([custom(t).mean((1, 2)).numpy() for t in tiles[:4]]), rtol=1e-6)


def test_batch_normalize_rejects_other_inputs():
    norm = BatchNormalize(IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match=r"\(B, h, w, 3\) uint8"):
        norm(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        norm(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="non-zero"):
        BatchNormalize((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))


def test_normalize_into_a_reused_buffer():
    norm = BatchNormalize(IMAGENET_MEAN, IMAGENET_STD)
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8))
    buffers = ReusedBuffer()
    first = buffers.get((4, 3, 6, 5), channels_last=False)
    got = norm(a, out=first)
    assert got.data_ptr() == first.data_ptr() and torch.equal(got, norm(a))
    short = buffers.get((2, 3, 6, 5), channels_last=False)  # a shorter last batch: the first rows, same memory
    assert short.shape == (2, 3, 6, 5) and short.data_ptr() == first.data_ptr()
    assert torch.equal(norm(a[:2], out=short), norm(a[:2]))
    cl = buffers.get((4, 3, 6, 5), channels_last=True)  # another memory format: a new buffer
    assert cl.is_contiguous(memory_format=torch.channels_last) and cl.data_ptr() != first.data_ptr()
    assert torch.equal(norm(a, True, out=cl), norm(a))
    assert buffers.get((4, 3, 7, 5), channels_last=True).shape == (4, 3, 7, 5)
    with pytest.raises(ValueError, match="out must be float32"):
        norm(a, out=torch.empty(4, 3, 6, 6))
