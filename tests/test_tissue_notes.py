"""The numbers docs/slides.md gives about the Otsu mask on fields without background and about reader-dependent
occupancy (the bundled slides)."""

from __future__ import annotations

import numpy as np
import pytest

from gigapath_core.api import build
from gigapath_core.stages.tiling import open_slide

DATA = "examples/data/"


def _grid(name: str, reader: str, **params):
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / DATA / name
    with open_slide(str(path), [reader]) as wsi:
        return build("tiler", "otsu", **params).tile(wsi, None)


@pytest.mark.parametrize("name, method, fraction, kept", [
    ("OS-1-detail.ome.tif", "saturation", 0.42, 1),  # H&E, ~100 % tissue, 1 whole tile
    ("OS-1-detail.ome.tif", "luminance", 0.44, 1),
    ("OS-2-ndpi.ome.tif", "saturation", 0.25, 8),  # Ki-67 IHC, 9 whole tiles
    ("OS-2-ndpi.ome.tif", "luminance", 0.0, 0),
])
def test_otsu_on_fields_without_background_outlines_nuclei_not_the_tissue(name, method, fraction, kept):
    grid = _grid(name, "tifffile", method=method)
    assert grid.info["tissue_fraction"] == pytest.approx(fraction, abs=0.005)
    assert len(grid.coords) == kept


def test_occupancy_differs_slightly_between_readers():
    a, b = (_grid("CMU-1-Small-Region.svs", r, min_occupancy=0.0) for r in ("openslide", "tifffile"))
    np.testing.assert_array_equal(a.coords, b.coords)
    diff = np.abs(np.asarray(a.occupancy) - np.asarray(b.occupancy))
    assert diff.max() == pytest.approx(0.044, abs=0.0005) and diff.min() >= 0
    keep_a, keep_b = np.asarray(a.occupancy) >= 0.1, np.asarray(b.occupancy) >= 0.1
    assert keep_a.sum() == 49 and np.array_equal(keep_a, keep_b)  # the same kept tiles here
