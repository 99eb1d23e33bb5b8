"""QuPath GeoJSON annotation masks (issue #17 item 5): a hand-written QuPath export on the bundled real slide
CMU-1-Small-Region.svs (2220 x 2967 level-0 px, 0.499 µm/px, tiles of 256.5 level-0 px), each kept tile checked
against the polygons with shapely; replace vs intersect; bad GeoJSON fails that slide only; a changed mask
re-tiles.

Independent reference for the occupancy rule (gigapath_core/masks.py): the tile box intersected with the
annotation region and with the tissue mask rebuilt here as the union of its pixel squares (shapely
``union_all`` of pixel boxes, not the run-length code under test).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely

import gigapath_core as gp
from gigapath_core.api import build
from gigapath_core.errors import MaskError
from gigapath_core.masks import MaskSpec, load_mask
from gigapath_core.stages.tiling import EXCLUDED_RGB, REGION_RGB, open_slide, outline_width, run_tiling
from gigapath_core.store import read_h5

READERS = ["openslide", "tifffile", "pyvips"]
W0, H0 = 2220, 2967
SIDE = 256 * 0.5 / 0.499  # level-0 px per tile

TUMOR = [[[600, 700], [1900, 700], [1900, 2400], [1200, 2700], [600, 2400], [600, 700]],
         [[1100, 1500], [1400, 1500], [1400, 1750], [1100, 1750], [1100, 1500]]]  # exterior + a hole
IGNORE = [[[1300, 900], [1800, 900], [1800, 1300], [1300, 1300], [1300, 900]]]
PEN = [[[600, 2200], [900, 2200], [900, 2500], [600, 2500], [600, 2200]]]
STROMA = [[[[150, 1050], [700, 1050], [700, 1350], [150, 1350], [150, 1050]]]]  # a MultiPolygon


def feature(geometry: dict, name: str | None = None, object_type: str = "annotation") -> dict:
    props: dict = {"objectType": object_type, "isLocked": False}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "id": "6c1e0a0e-0000-0000-0000-000000000000", "geometry": geometry, "properties": props}


def qupath_export() -> dict:
    """What QuPath 0.5 writes for: a Tumor annotation with a hole, a Stroma MultiPolygon, an 'Ignore*' and a
    'pen marker' annotation (to cut out), a detection and a point (both skipped)."""
    return {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": TUMOR}, "Tumor"),
        feature({"type": "MultiPolygon", "coordinates": STROMA}, "Stroma"),
        feature({"type": "Polygon", "coordinates": IGNORE}, "Ignore*"),
        feature({"type": "Polygon", "coordinates": PEN}, "pen marker"),
        feature({"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]}, None, "detection"),
        feature({"type": "Point", "coordinates": [1000, 1000]}, "Tumor"),
    ]}


def expected_region() -> shapely.Geometry:
    include = shapely.union_all([shapely.Polygon(TUMOR[0], [TUMOR[1]]), shapely.Polygon(STROMA[0][0])])
    return include.difference(shapely.union_all([shapely.Polygon(IGNORE[0]), shapely.Polygon(PEN[0])]))


def write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
    return path


def tile_boxes(origins: np.ndarray) -> np.ndarray:
    """Tile boxes from exact (unrounded) level-0 origins; ``coords`` are these rounded to whole px."""
    return shapely.box(origins[:, 0], origins[:, 1], origins[:, 0] + SIDE, origins[:, 1] + SIDE)


def origins(grid_coords: np.ndarray) -> np.ndarray:
    return grid_coords / 256 * SIDE


def all_cells() -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(int(W0 // SIDE)), np.arange(int(H0 // SIDE)))
    return np.stack([cols.ravel() * SIDE, rows.ravel() * SIDE], 1)


def tissue_geometry(mask: np.ndarray) -> shapely.Geometry:
    """The tissue mask as the union of its pixel squares in level-0 px (reference, not the code under test)."""
    ds = W0 / mask.shape[1], H0 / mask.shape[0]
    ii, jj = np.nonzero(mask)
    return shapely.coverage_union_all(shapely.box(jj * ds[0], ii * ds[1], (jj + 1) * ds[0], (ii + 1) * ds[1]))


@pytest.fixture(scope="module")
def cmu(example_slide):
    with open_slide(str(example_slide), READERS) as wsi:
        yield wsi


def test_load_qupath_export(tmp_path):
    m = load_mask(MaskSpec(str(write(tmp_path / "a.geojson", qupath_export()))), "slide.svs", (W0, H0))
    assert (m.n_include, m.n_exclude, m.n_skipped, m.n_repaired) == (2, 2, 2, 0)
    assert m.region.symmetric_difference(expected_region()).area < 1e-6
    attrs = m.attrs()
    assert attrs["mask_mode"] == "intersect" and attrs["mask_classes"] == ["Ignore*", "Stroma", "Tumor", "pen marker"]
    assert len(attrs["mask_sha256"]) == 64


def test_other_qupath_layouts(tmp_path):
    """A bare list of Features (QuPath's default export), a derived class written as ``names``, QuPath 0.2's
    ``object_type``, a single Feature; exclusion patterns are case-insensitive fnmatch."""
    feats = qupath_export()["features"]
    feats[0]["properties"]["classification"] = {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}
    feats[1]["properties"] = {"object_type": "annotation", "classification": {"name": "IGNORE-me"}}
    m = load_mask(MaskSpec(str(write(tmp_path / "list.geojson", feats))), "s", (W0, H0))
    assert (m.n_include, m.n_exclude) == (1, 3) and "Tumor: Positive" in m.classes
    single = load_mask(MaskSpec(str(write(tmp_path / "one.geojson", feats[0]))), "s", (W0, H0))
    assert single.region.area == pytest.approx(shapely.Polygon(TUMOR[0], [TUMOR[1]]).area)


def test_exclusions_only_cut_out_of_the_tissue(tmp_path, cmu):
    """intersect + only excluded annotations: the whole slide minus them (tissue minus pen marks)."""
    doc = {"type": "FeatureCollection", "features": [feature({"type": "Polygon", "coordinates": PEN}, "Pen")]}
    m = load_mask(MaskSpec(str(write(tmp_path / "pen.geojson", doc))), "s", (W0, H0))
    assert m.include is None and m.region.area == pytest.approx(W0 * H0 - shapely.Polygon(PEN[0]).area)
    with pytest.raises(MaskError, match="no included annotation: all 1 polygon"):
        load_mask(MaskSpec(m.path, mode="replace"), "s", (W0, H0))


def test_intersect_keeps_only_tissue_inside_the_region(tmp_path, cmu):
    """Rule: occupancy = area(tile ∩ tissue ∩ region) / area(tile), kept at >= 0.1; checked per tile."""
    spec = MaskSpec(str(write(tmp_path / "a.geojson", qupath_export())))
    grid = run_tiling(build("tiler", "otsu"), cmu, tmp_path, None, {"slide_id": "x"}, mask=spec)
    plain = build("tiler", "otsu").tile(cmu)
    region = expected_region()
    tissue = tissue_geometry(grid.tissue_mask)
    assert 0 < len(grid) < len(plain)
    np.testing.assert_allclose(grid.coords, origins(grid.grid_coords), atol=0.5)
    boxes = tile_boxes(origins(grid.grid_coords))
    ref = shapely.area(shapely.intersection(shapely.intersection(boxes, region), tissue)) / SIDE**2
    np.testing.assert_allclose(grid.occupancy, ref, atol=1e-4)
    assert (ref >= 0.1 - 1e-4).all()
    # and no dropped tile reaches 0.1: every tile of the unmasked grid not kept here has < 0.1 inside the region
    kept = {tuple(c) for c in grid.grid_coords}
    dropped = origins(np.array([c for c in plain.grid_coords if tuple(c) not in kept]))
    dref = shapely.area(shapely.intersection(shapely.intersection(tile_boxes(dropped), region), tissue)) / SIDE**2
    assert (dref < 0.1 + 1e-4).all()
    # nothing inside the Ignore / pen annotations or the Tumor hole, nothing outside the included ones
    for cut in (shapely.Polygon(IGNORE[0]), shapely.Polygon(PEN[0]), shapely.Polygon(TUMOR[1])):
        assert not shapely.within(boxes, cut).any()
    assert shapely.intersects(boxes, region).all()
    # recorded: which mask, and the outline drawn in its own colour with a width that scales
    _, attrs = read_h5(tmp_path / "tiles.h5")
    assert attrs["mask_path"] == spec.path and attrs["mask_mode"] == "intersect" and attrs["mask_n_exclude"] == 2
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "thumbnail.png").convert("RGB"))
    assert outline_width(png.shape) == 2 and (png == REGION_RGB).all(-1).sum() > 500
    h = png.shape[0] - 60  # above the legend band: the exclusions drawn over the region's holes
    assert (png[:h] == EXCLUDED_RGB).all(-1).sum() > 100


def test_whole_slide_annotation_changes_nothing(tmp_path, cmu):
    doc = [feature({"type": "Polygon", "coordinates": [[[0, 0], [W0, 0], [W0, H0], [0, H0], [0, 0]]]}, "Region*")]
    spec = MaskSpec(str(write(tmp_path / "all.geojson", doc)))
    grid = build("tiler", "otsu").tile(cmu, None, load_mask(spec, cmu.path, (W0, H0)))
    plain = build("tiler", "otsu").tile(cmu)
    np.testing.assert_array_equal(grid.coords, plain.coords)
    np.testing.assert_allclose(grid.occupancy, plain.occupancy, atol=1e-5)


def test_replace_uses_the_annotation_instead_of_the_tissue(tmp_path, cmu):
    spec = str(write(tmp_path / "a.geojson", qupath_export()))
    tiler = build("tiler", "otsu")
    inter = tiler.tile(cmu, None, load_mask(MaskSpec(spec), cmu.path, (W0, H0)))
    repl = tiler.tile(cmu, None, load_mask(MaskSpec(spec, mode="replace"), cmu.path, (W0, H0)))
    cells = all_cells()
    frac = shapely.area(shapely.intersection(tile_boxes(cells), expected_region())) / SIDE**2
    want = cells[frac >= 0.1]  # row-major already
    np.testing.assert_allclose(repl.coords, np.round(want), atol=0.5)
    np.testing.assert_allclose(repl.occupancy, frac[frac >= 0.1], atol=1e-5)
    si, sr = {tuple(c) for c in inter.coords}, {tuple(c) for c in repl.coords}
    assert si < sr  # replace also keeps glass inside the annotation
    plain = {tuple(c) for c in tiler.tile(cmu).coords}
    assert sr - plain  # tiles with no tissue by Otsu, kept because they lie in the annotation
    assert repl.info["mask_mode"] == "replace" and inter.info["mask_mode"] == "intersect"


def test_self_intersecting_polygon_is_repaired(tmp_path):
    bowtie = [[[600, 700], [1600, 1700], [1600, 700], [600, 1700], [600, 700]]]
    m = load_mask(MaskSpec(str(write(tmp_path / "b.geojson", [feature({"type": "Polygon", "coordinates": bowtie})]))),
                  "s", (W0, H0))
    assert m.n_repaired == 1 and m.region.area == pytest.approx(2 * 0.25 * 1000 * 1000)  # two triangles


@pytest.mark.parametrize("doc,reason", [
    ("{not json", "not JSON (line 1 column 2: Expecting property name enclosed in double quotes)"),
    ({"type": "Topology"}, "not GeoJSON features: expected a FeatureCollection, a Feature or a list of Features "
                           "(got dict 'Topology')"),
    ([], "no polygon annotation in the file (0 feature(s), 0 skipped: detections, cells, points or lines)"),
    ([feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [20, 20], [0, 0]]]}, "Tumor")],
     "feature 0 (class 'Tumor'): invalid polygon (Self-intersection[10 10]) that make_valid cannot repair (no area left)"),
    ([feature({"type": "Polygon", "coordinates": [[[0, 0], [10, 0]]]}, "Tumor")],
     "feature 0 (class 'Tumor'): malformed geometry"),
    ([feature({"type": "Polygon", "coordinates": [[[x * 10, y * 10] for x, y in TUMOR[0]]]}, "Tumor")],
     "of the annotated area lies outside the slide (level-0 bounds 2220 x 2967 px; annotations span x 6000..19000, "
     "y 7000..27000): coordinates must be level-0 px"),
    ([feature({"type": "Polygon", "coordinates": IGNORE}, "Tumor"), feature({"type": "Polygon", "coordinates": [
        [[1200, 800], [1900, 800], [1900, 1400], [1200, 1400], [1200, 800]]]}, "Artefact")],
     "nothing left to tile: the included annotations lie outside the slide or are entirely cut out"),
])
def test_bad_geojson_reason(tmp_path, doc, reason):
    path = write(tmp_path / "bad.geojson", doc)
    with pytest.raises(MaskError) as err:
        load_mask(MaskSpec(str(path)), "/slides/s.svs", (W0, H0))
    assert str(err.value).startswith(f"/slides/s.svs: mask {path}: ")
    assert reason in str(err.value)


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_pipeline_masks_folder_bad_mask_fails_that_slide_and_change_retiles(tmp_path, example_slide):
    """inputs.masks folder: CMU's mask is used (tiles.h5 records it); OS-1's mask is not JSON: that slide fails
    with MaskError naming the file, CMU finishes; editing CMU's mask re-tiles it, an unchanged re-run skips."""
    masks = tmp_path / "masks"
    masks.mkdir()
    write(masks / "CMU-1-Small-Region.geojson", qupath_export())
    write(masks / "OS-1-detail.geojson", "<xml/>")
    cfg = {"inputs": {"slides": [str(example_slide), str(example_slide.parent / "OS-1-detail.ome.tif")],
                      "masks": str(masks)}}
    out = tmp_path / "out"
    assert gp.run(cfg, out=str(out)) == 1
    rows = _rows(out)
    assert rows["OS-1-detail"]["status"] == "failed" and rows["OS-1-detail"]["error_type"] == "MaskError"
    assert rows["OS-1-detail"]["reason"].endswith(f"mask {masks / 'OS-1-detail.geojson'}: not JSON "
                                                  "(line 1 column 1: Expecting value)")
    assert rows["CMU-1-Small-Region"]["status"] == "ok"
    tiles = out / "CMU-1-Small-Region" / "tiles.h5"
    data, attrs = read_h5(tiles)
    assert attrs["mask_path"] == str(masks / "CMU-1-Small-Region.geojson")
    n_before = len(data["coords"])

    assert gp.run(cfg, out=str(out)) == 1
    assert _rows(out)["CMU-1-Small-Region"]["this_run"] == "skipped"

    doc = qupath_export()
    doc["features"] = doc["features"][:1]  # drop Stroma and the exclusions: more tiles
    write(masks / "CMU-1-Small-Region.geojson", doc)
    assert gp.run(cfg, out=str(out)) == 1
    assert _rows(out)["CMU-1-Small-Region"]["status"] == "ok"
    data2, attrs2 = read_h5(tiles)
    assert attrs2["mask_sha256"] != attrs["mask_sha256"] and len(data2["coords"]) > n_before


def test_manifest_mask_column(tmp_path, example_slide):
    write(tmp_path / "roi.geojson", qupath_export())
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_path,mask\n{example_slide},roi.geojson\n")
    from gigapath_core.config import InputsConfig, collect_slides

    (s,) = collect_slides(InputsConfig(manifest=str(manifest)), tmp_path)
    assert s.mask == str(tmp_path / "roi.geojson")
    out = tmp_path / "out"
    assert gp.run({"inputs": {"manifest": str(manifest)}, "readers": ["openslide"]}, out=str(out)) == 0
    _, attrs = read_h5(out / "CMU-1-Small-Region" / "tiles.h5")
    assert attrs["mask_path"] == str(tmp_path / "roi.geojson") and attrs["mask_n_include"] == 2
