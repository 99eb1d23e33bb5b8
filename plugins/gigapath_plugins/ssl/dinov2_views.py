"""DINOv2 data view: multi-crop augmentation of one tile and the iBOT patch masks (DINOv2 §4 / appendix).

Every random choice comes from the ``numpy.random.Generator`` passed in, so a view is a pure function of
(tile, seed): a resumed run regenerates exactly the views it would have seen.

Recipe (DINOv2 defaults): 2 global crops (random resized crop, scale 0.32–1, 224 px) and ``n_local`` local
crops (scale 0.05–0.32, 96–98 px); horizontal flip p = 0.5; colour jitter (brightness 0.4, contrast 0.4,
saturation 0.2, hue 0.1) p = 0.8; grayscale p = 0.2; Gaussian blur p = 1.0 / 0.1 / 0.5 (global 1, global 2,
local); solarisation p = 0.2 on global 2; ImageNet normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MultiCropConfig:
    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    patch_size: int = 14
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def resized_crop_box(
    h: int, w: int, scale: tuple[float, float], rng: np.random.Generator, ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """Random (top, left, height, width) covering ``scale`` of the area with log-uniform aspect ``ratio``
    (the RandomResizedCrop rule; falls back to the largest centred crop after 10 tries)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def _jitter(img: Image.Image, strength: tuple[float, float, float, float], rng: np.random.Generator) -> Image.Image:
    import torchvision.transforms.functional as TF

    b, c, s, hue = strength
    ops = [
        lambda im: TF.adjust_brightness(im, rng.uniform(max(0, 1 - b), 1 + b)),
        lambda im: TF.adjust_contrast(im, rng.uniform(max(0, 1 - c), 1 + c)),
        lambda im: TF.adjust_saturation(im, rng.uniform(max(0, 1 - s), 1 + s)),
        lambda im: TF.adjust_hue(im, rng.uniform(-hue, hue)),
    ]
    for i in rng.permutation(4):
        img = ops[i](img)
    return img


def augment(
    img: Image.Image,
    size: int,
    scale: tuple[float, float],
    cfg: MultiCropConfig,
    rng: np.random.Generator,
    p_blur: float,
    p_solarize: float,
) -> torch.Tensor:
    """One crop: PIL RGB image -> (3, size, size) float32 normalised tensor."""
    import torchvision.transforms.functional as TF

    top, left, ch, cw = resized_crop_box(img.height, img.width, scale, rng)
    img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        img = _jitter(img, cfg.jitter, rng)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < p_blur:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    if rng.random() < p_solarize:
        img = TF.solarize(img, 128)
    return TF.normalize(TF.to_tensor(img), cfg.mean, cfg.std)


def patch_mask(n_patches: int, cfg: MultiCropConfig, rng: np.random.Generator) -> np.ndarray:
    """(n_patches,) bool: with probability ``mask_probability`` a random ``U(mask_ratio)`` fraction of the
    patches is masked (at least one), otherwise none."""
    mask = np.zeros(n_patches, dtype=bool)
    if rng.random() < cfg.mask_probability:
        k = max(1, int(round(rng.uniform(*cfg.mask_ratio) * n_patches)))
        mask[rng.choice(n_patches, size=min(k, n_patches), replace=False)] = True
    return mask


def multicrop_view(tile: np.ndarray, cfg: MultiCropConfig, rng: np.random.Generator) -> dict:
    """(H, W, 3) uint8 tile -> ``{"global": (2, 3, G, G), "local": (n_local, 3, L, L), "masks": (2, P) bool}``
    with P = (G / patch_size)^2 patches per global crop."""
    img = Image.fromarray(np.ascontiguousarray(tile)).convert("RGB")
    g1 = augment(img, cfg.global_size, cfg.global_scale, cfg, rng, p_blur=1.0, p_solarize=0.0)
    g2 = augment(img, cfg.global_size, cfg.global_scale, cfg, rng, p_blur=0.1, p_solarize=0.2)
    locs = [
        augment(img, cfg.local_size, cfg.local_scale, cfg, rng, p_blur=0.5, p_solarize=0.0) for _ in range(cfg.n_local)
    ]
    n_patches = (cfg.global_size // cfg.patch_size) ** 2
    masks = np.stack([patch_mask(n_patches, cfg, rng) for _ in range(2)])
    return {
        "global": torch.stack([g1, g2]),
        "local": torch.stack(locs) if locs else torch.zeros(0, 3, cfg.local_size, cfg.local_size),
        "masks": torch.from_numpy(masks),
    }


def collate_multicrop(views: list[dict]) -> dict:
    """B views -> crop-major batch: ``global`` (2B, 3, G, G) ordered [crop 0 of every tile, crop 1 of every
    tile], ``local`` (n_local * B, 3, L, L) likewise, ``masks`` (2B, P) bool."""
    return {
        "global": torch.cat([torch.stack([v["global"][i] for v in views]) for i in range(2)]),
        "local": torch.cat([torch.stack([v["local"][i] for v in views]) for i in range(views[0]["local"].shape[0])])
        if views[0]["local"].shape[0]
        else torch.zeros(0),
        "masks": torch.cat([torch.stack([v["masks"][i] for v in views]) for i in range(2)]),
    }
