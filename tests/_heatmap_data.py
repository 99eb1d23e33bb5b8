"""A small real embed run for the heatmap and report tests: the bundled OS-2-ndpi slide (0.2271 µm/px, the
"0.25 µm/px, 40x" class) tiled at 128 px, plus one broken slide (a failed row); tile embeddings are random
8-d vectors; a 2-fold ABMIL fine-tuning on a synthetic 8-d cohort gives the trained head."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SLIDE = ROOT / "examples" / "data" / "OS-2-ndpi.ome.tif"
BROKEN = ROOT / "tests" / "data" / "bad-slides" / "broken-random-ascii.svs"
DIM = 8


def make_embed_run(out: Path) -> Path:
    import gigapath_core as gp
    from gigapath_core.stages.tile_embedding import write_tile_embeddings
    from gigapath_core.store import read_h5, read_status, rebuild_manifest, write_status

    gp.run({"inputs": {"slides": [str(BROKEN), str(SLIDE)]}, "output": str(out),
            "readers": ["openslide", "tifffile"], "tiler": {"name": "otsu", "params": {"tile_size": 128}}})
    sdir = out / "OS-2-ndpi"
    tiles, _ = read_h5(sdir / "tiles.h5")
    feats = np.random.default_rng(0).normal(size=(len(tiles["coords"]), DIM)).astype(np.float32)
    feats[: len(feats) // 3, 0] += 3.0  # some tiles look like the positive class
    write_tile_embeddings(sdir / "tile_embeddings.h5", feats, tiles["coords"], tiles["grid_coords"],
                          {"tile_encoder": "synthetic", "weights_source": "random"})
    status = read_status(sdir)
    write_status(sdir, {**status, "weights": "tile_encoder=random"})
    rebuild_manifest(out, ["broken-random-ascii", "OS-2-ndpi"])
    return out


def make_finetune_run(root: Path) -> Path:
    import gigapath_core as gp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_finetune import config, make_cohort

    make_cohort(root, n_patients=6, dim=DIM)
    gp.run(config(root, **{"folds.k": 2, "train.epochs": 1}))
    return root / "out"
