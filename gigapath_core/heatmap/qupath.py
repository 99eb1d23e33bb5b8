"""Per-tile scores as a QuPath GeoJSON FeatureCollection: one ``detection`` per tile (its square in level-0
px) with ``properties.measurements`` = {name: number}, so QuPath's Measure > Show measurement maps colours
the tiles by attention or class score.

Layout as QuPath >= 0.4 reads and writes it (qupath/qupath, qupath-core/src/main/java/qupath/lib/io/
PathObjectTypeAdapters.java): ``id`` a UUID string, ``properties.objectType`` ("detection"),
``properties.name``, ``properties.measurements`` as a JSON object of finite numbers. Import: drag the file onto
the open slide in QuPath (or File > Import objects from file).
"""

from __future__ import annotations

import math
import uuid

import numpy as np


def tile_features_geojson(slide_id: str, coords: np.ndarray, tile_side: tuple[float, float],
                          measurements: dict[str, np.ndarray], level0_size: tuple[int, int] | None = None) -> dict:
    """FeatureCollection of one square detection per tile.

    Args:
        coords: (N, 2) level-0 px top-left (x, y).
        tile_side: (w, h) of a tile in level-0 px.
        measurements: name -> (N,) values (non-finite values are left out of that tile's measurements).
        level0_size: (W, H) of level 0; squares are clipped to it so every coordinate lies within the slide.
    Ids are UUIDs derived from (slide_id, tile index): stable across re-runs.
    """
    feats = []
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in measurements.items()}
    W, H = level0_size if level0_size else (math.inf, math.inf)
    for i, (x, y) in enumerate(c):
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(W, x + tile_side[0]), min(H, y + tile_side[1])
        ring = [[round(x0, 2), round(y0, 2)], [round(x1, 2), round(y0, 2)], [round(x1, 2), round(y1, 2)],
                [round(x0, 2), round(y1, 2)], [round(x0, 2), round(y0, 2)]]
        meas = {k: float(v[i]) for k, v in cols.items() if math.isfinite(v[i])}
        feats.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"gigapath:{slide_id}:tile:{i}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "detection", "name": f"tile {i} ({int(x)}, {int(y)})",
                           "measurements": meas},
        })
    return {"type": "FeatureCollection", "features": feats}
