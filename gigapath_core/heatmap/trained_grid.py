"""Which tile grid a finetune model was trained on, and whether an embed run's tiles match it.

A head trained on tile embeddings of 128-px tiles at 0.5 µm/px (64 µm of tissue) sees 256-px tiles (128 µm) as
another input distribution, and a slide encoder inside the model places them on another position grid: the
heatmap would still be drawn, but it would not show what the model learned. ``gigapath heatmap --model`` warns.

Where the grid comes from:

- ``metrics.json`` ``models.tile_size`` / ``models.target_mpp`` (lists of the values found in the training
  embeddings; :class:`gigapath_core.finetune.data.FinetuneData` ``grid``), written by finetune runs since this
  record was added;
- older finetune outputs record no grid (their ``config.yaml`` ``data.tile_size`` is only the fallback for feature
  files that record none, 256 by default, not what the embeddings were): the grid is then read from one slide of
  the training embeddings (``config.yaml`` ``data.embeddings``) when they are still there, else it is unknown.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("gigapath")


def trained_grid(run_dir: str | Path) -> tuple[dict[str, list], str] | None:
    """(``{"tile_size": [px, ...], "target_mpp": [µm/px, ...]}``, where it was found) of a finetune output
    folder, or None when neither ``metrics.json`` nor the training embeddings tell it. Never raises."""
    run_dir = Path(run_dir)
    try:
        models = json.loads((run_dir / "metrics.json").read_text()).get("models") or {}
    except (OSError, ValueError, AttributeError):
        models = {}
    if models.get("tile_size"):
        return ({"tile_size": [int(v) for v in models["tile_size"]],
                 "target_mpp": [float(v) for v in models.get("target_mpp") or []]}, f"{run_dir / 'metrics.json'}")
    return _from_training_embeddings(run_dir)


def _from_training_embeddings(run_dir: Path) -> tuple[dict[str, list], str] | None:
    import yaml

    from ..errors import GigapathError
    from ..interop import FeatureLocator, read_tile_features

    try:
        data: dict[str, Any] = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("data") or {}
        sources = data.get("embeddings") or []
        sources = [sources] if isinstance(sources, str) else list(sources)
        first = next(iter(FeatureLocator(sources, "data.embeddings").all().values()), None)
        if first is None:
            return None
        tf = read_tile_features(first.path, level0_mpp=first.level0_mpp or data.get("level0_mpp"),
                                coords_unit=data.get("coords_unit"), tile_size=data.get("tile_size"))
    except (GigapathError, OSError, ValueError, AttributeError, TypeError, yaml.YAMLError) as err:
        log.debug("heatmap: the grid of %s's training embeddings is unknown: %s", run_dir, err)
        return None
    return {"tile_size": [int(tf.tile_size)], "target_mpp": [float(tf.target_mpp)]}, f"{first.path}"


def grid_mismatch(trained: dict[str, list], tile_size: int, target_mpp: float, run: str = "the run") -> str | None:
    """``"trained on 128-px tiles, but <run> has 256-px tiles (both at 0.5 µm/px)"`` when the run's grid
    (``tile_size`` px at ``target_mpp``) is not the trained one (mpp named on each side when it differs), else None.
    """
    sizes, mpps = trained.get("tile_size") or [], trained.get("target_mpp") or []
    size_differs = bool(sizes) and int(tile_size) not in sizes
    mpp_differs = bool(mpps) and not any(abs(float(target_mpp) - m) <= 1e-6 * max(1.0, m) for m in mpps)
    if not (size_differs or mpp_differs):
        return None
    size = "/".join(str(int(v)) for v in sizes) or "?"
    mpp = "/".join(f"{float(v):g}" for v in mpps) or "?"
    if mpp_differs:
        return (f"trained on {size}-px tiles at {mpp} µm/px, but {run} has {int(tile_size)}-px tiles at "
                f"{float(target_mpp):g} µm/px")
    return f"trained on {size}-px tiles, but {run} has {int(tile_size)}-px tiles (both at {float(target_mpp):g} µm/px)"
