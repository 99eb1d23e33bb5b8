"""Annotation masks: per-slide QuPath GeoJSON that restricts (``intersect``) or replaces (``replace``) the tissue
mask of the tiler (issue #17 item 5).

Input format — what QuPath writes with *File > Export objects as GeoJSON* (QuPath source:
``qupath-core/src/main/java/qupath/lib/io/GsonTools.java`` and ``PathObjectTypeAdapters.java``):
a ``FeatureCollection``, a bare JSON list of ``Feature`` objects, or a single ``Feature``; each feature's
``geometry`` a ``Polygon`` or ``MultiPolygon`` (with holes), coordinates in **level-0 px** (x right, y down);
``properties.objectType`` (``annotation``; QuPath <= 0.2 wrote ``object_type``) and
``properties.classification.name`` (QuPath >= 0.4 may write ``names`` for a derived class: joined with ``": "``
as QuPath displays it).

Rules (docs/slides.md "Annotation masks"):

- Only annotations count (features without ``objectType`` too); detections, cells, tiles and TMA cores are
  skipped, as are geometries without area (points, lines).
- A feature whose class name matches one of ``exclude`` (fnmatch, case-insensitive; default ``Ignore*``,
  ``Pen*``, ``Artefact*``, ``Artifact*``) is *cut out*; every other polygon (unclassified included) is
  *included*. The **region** is ``(union(included) ∩ slide) − union(excluded)``. In ``intersect`` mode a file
  with exclusions only cuts them out of the whole slide (the tissue minus pen marks).
- An invalid polygon (e.g. a self-intersecting freehand outline) is repaired with ``shapely.make_valid`` (the
  lobes of a figure-eight each count) and counted in ``mask_n_repaired``; one that has no area left after
  repair fails the slide.
- :class:`~gigapath_core.errors.MaskError` (the slide fails, the batch goes on) when the file is missing, not
  JSON, not GeoJSON features, has no polygon, has an unrepairable polygon or non-finite coordinates, when more
  than half of the annotated area lies outside the slide's level-0 bounds (a wrong frame: µm, thumbnail px or
  another level's px), when ``replace`` mode has no included annotation, or when nothing is left to tile.

Tile rule (applied by the tiler): a tile's occupancy is the area fraction of the tile box inside
``tissue ∩ region`` (``intersect``; the tissue mask taken as the union of its pixel squares) or inside
``region`` (``replace``), computed exactly with shapely; the tile is kept when it is >= ``min_occupancy``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MaskError

DEFAULT_EXCLUDE: tuple[str, ...] = ("Ignore*", "Pen*", "Artefact*", "Artifact*")
MASK_MODES = ("intersect", "replace")
#: a mask whose annotated area lies more than this fraction outside the slide is in the wrong frame
MAX_OUTSIDE_FRACTION = 0.5
_SKIPPED_TYPES = {"detection", "cell", "tile", "tma_core", "tmacore", "root"}


@dataclass(frozen=True)
class MaskSpec:
    """Which mask a slide uses: the file, ``intersect`` or ``replace``, and the excluded class patterns."""

    path: str
    mode: str = "intersect"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE


@dataclass
class AnnotationMask:
    """A loaded, validated annotation mask in level-0 px.

    Attributes:
        region: shapely (Multi)Polygon, ``(included ∩ slide) − excluded``, level-0 px; never empty.
        include: union of the included polygons (None: none, exclusions only), level-0 px.
        exclude: union of the excluded polygons (possibly empty), level-0 px.
    """

    path: str
    sha256: str
    mode: str
    exclude_patterns: tuple[str, ...]
    region: Any
    include: Any
    exclude: Any
    n_include: int = 0
    n_exclude: int = 0
    n_skipped: int = 0
    n_repaired: int = 0
    classes: list[str] = field(default_factory=list)

    def attrs(self) -> dict[str, Any]:
        """tiles.h5 attributes recording which mask was used."""
        return {"mask_path": self.path, "mask_sha256": self.sha256, "mask_mode": self.mode,
                "mask_exclude": list(self.exclude_patterns), "mask_n_include": self.n_include,
                "mask_n_exclude": self.n_exclude, "mask_n_skipped": self.n_skipped,
                "mask_n_repaired": self.n_repaired, "mask_classes": sorted(set(self.classes)),
                "mask_region_area_px": float(self.region.area)}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def mask_identity(spec: MaskSpec | None) -> dict[str, Any] | None:
    """What the tiling fingerprint records about a mask: path, content hash (or why it is unreadable), mode,
    exclude patterns. A changed file, mode or pattern list re-tiles the slide."""
    if spec is None:
        return None
    try:
        digest = file_sha256(spec.path)
    except OSError as err:
        digest = f"unreadable: {err.strerror or err}"
    return {"path": spec.path, "sha256": digest, "mode": spec.mode, "exclude": list(spec.exclude)}


def class_name(props: dict) -> str:
    """QuPath classification name of a feature's properties ('' when unclassified)."""
    cls = props.get("classification")
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list):
            return ": ".join(str(n) for n in names)
    return ""


def is_excluded(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """True when ``name`` matches one of the fnmatch ``patterns``, case-insensitively."""
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, p.lower()) for p in patterns)


def _features(doc: Any) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection" and isinstance(doc.get("features"), list):
            return doc["features"]
        if kind == "Feature":
            return [doc]
        if kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            return [{"type": "Feature", "geometry": doc, "properties": {}}]
    raise ValueError("not GeoJSON features: expected a FeatureCollection, a Feature or a list of Features "
                     f"(got {type(doc).__name__}{' ' + repr(doc.get('type')) if isinstance(doc, dict) else ''})")


def _polygonal(geom):
    """The polygonal part of a geometry (Polygon/MultiPolygon parts of a collection), or None."""
    import shapely

    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def load_mask(spec: MaskSpec, slide_path: str, level0_size: tuple[int, int]) -> AnnotationMask:
    """Read and validate ``spec.path`` for a slide of ``level0_size`` (w, h) level-0 px (rules: module docstring).

    Raises:
        MaskError: the mask cannot be used (the message names the file and the reason).
    """
    import shapely
    from shapely.geometry import shape

    def fail(msg: str) -> MaskError:
        return MaskError(slide_path, spec.path, msg)

    if spec.mode not in MASK_MODES:  # a caller bug: the config validates inputs.mask_mode
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {spec.mode!r}")

    try:
        raw = Path(spec.path).read_bytes()
    except FileNotFoundError:
        raise fail("file not found (inputs.masks expects <slide_id>.geojson in that folder; the manifest column "
                   "'mask' a path relative to the manifest)") from None
    except OSError as err:
        raise fail(f"cannot read the file: {err.strerror or err}") from None
    try:
        doc = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise fail("not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as err:
        raise fail(f"not JSON (line {err.lineno} column {err.colno}: {err.msg})") from None
    try:
        features = _features(doc)
    except ValueError as err:
        raise fail(str(err)) from None

    include, exclude, classes = [], [], []
    n_skipped = n_repaired = 0
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise fail(f"feature {i} is not a JSON object")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            props = {}
        otype = str(props.get("objectType", props.get("object_type", "annotation")) or "annotation").lower()
        geo = feat.get("geometry")
        if otype in _SKIPPED_TYPES or geo is None:
            n_skipped += 1
            continue
        name = class_name(props)
        label = f"feature {i}" + (f" (class {name!r})" if name else " (unclassified)")
        try:
            geom = shape(geo)
        except Exception as err:  # shapely raises assorted errors on malformed coordinates
            raise fail(f"{label}: malformed geometry ({type(err).__name__}: {err})") from None
        if geom.is_empty or geom.geom_type not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            n_skipped += 1  # points and lines have no area
            continue
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise fail(f"{label}: non-finite coordinates")
        if not geom.is_valid:
            reason = shapely.is_valid_reason(geom)
            repaired = _polygonal(shapely.make_valid(geom))
            if repaired is None or repaired.area <= 0:
                raise fail(f"{label}: invalid polygon ({reason}) that make_valid cannot repair (no area left)")
            geom, n_repaired = repaired, n_repaired + 1
        else:
            geom = _polygonal(geom)
            if geom is None:
                n_skipped += 1
                continue
        if geom.area <= 0:
            raise fail(f"{label}: polygon with zero area")
        (exclude if is_excluded(name, spec.exclude) else include).append(geom)
        classes.append(name)

    if not include and not exclude:
        raise fail(f"no polygon annotation in the file ({len(features)} feature(s), {n_skipped} skipped: "
                   "detections, cells, points or lines)")
    w0, h0 = level0_size
    slide = shapely.box(0, 0, w0, h0)
    everything = shapely.union_all(include + exclude)
    outside = 1.0 - everything.intersection(slide).area / everything.area
    if outside > MAX_OUTSIDE_FRACTION:
        x0, y0, x1, y1 = everything.bounds
        raise fail(f"{outside:.0%} of the annotated area lies outside the slide (level-0 bounds {w0} x {h0} px; "
                   f"annotations span x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}): coordinates must be level-0 px "
                   "as QuPath exports them (not µm, thumbnail or another level's px)")
    inc = shapely.union_all(include) if include else None
    exc = shapely.union_all(exclude) if exclude else shapely.Polygon()
    if inc is None and spec.mode == "replace":
        raise fail(f"no included annotation: all {len(exclude)} polygon(s) match mask_exclude "
                   f"{list(spec.exclude)}, and mask_mode 'replace' needs a region to tile")
    region = (inc if inc is not None else slide).intersection(slide).difference(exc)
    region = _polygonal(region) if not region.is_empty else None
    if region is None or region.area <= 0:
        raise fail("nothing left to tile: the included annotations lie outside the slide or are entirely cut out "
                   f"by the excluded ones (mask_exclude {list(spec.exclude)})")
    return AnnotationMask(path=spec.path, sha256=hashlib.sha256(raw).hexdigest(), mode=spec.mode,
                          exclude_patterns=tuple(spec.exclude), region=region, include=inc, exclude=exc,
                          n_include=len(include), n_exclude=len(exclude), n_skipped=n_skipped,
                          n_repaired=n_repaired, classes=classes)


# ------------------------------------------------------------------------------------------ occupancy
def _mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels: (row, start col, end col exclusive), sorted by row."""
    padded = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(padded, axis=1)
    rs, cs = np.nonzero(d == 1)
    re_, ce = np.nonzero(d == -1)  # same row order (C-order scan), one end per start
    assert np.array_equal(rs, re_)
    return rs, cs, ce


def region_occupancy(region, n_cols: int, n_rows: int, side0: tuple[float, float], candidates: np.ndarray | None,
                     tissue: np.ndarray | None = None, mask_ds: tuple[float, float] = (1.0, 1.0),
                     tissue_occ: np.ndarray | None = None, step0: tuple[float, float] | None = None) -> np.ndarray:
    """(n_rows, n_cols) float32 area fraction of each grid cell inside ``region`` (∩ tissue when given).

    Args:
        region: shapely geometry in level-0 px.
        side0: (w, h) of a grid cell in level-0 px; cell (r, c) is [c*w, (c+1)*w) x [r*h, (r+1)*h).
        candidates: (n_rows, n_cols) bool of the cells to evaluate (others get 0), or None for all.
        tissue: (h, w) bool tissue mask, pixel (i, j) covering [j*dsx, (j+1)*dsx) x [i*dsy, (i+1)*dsy) level-0 px
            (``mask_ds`` = (dsx, dsy)); with it the fraction is of ``tissue ∩ region``.
        tissue_occ: (n_rows, n_cols) tissue-only occupancy, used for cells entirely inside ``region``.
        step0: (x, y) level-0 px between neighbouring cells (a tiler ``stride``); None = ``side0``: cell (r, c)
            is then [c*sx, c*sx + w) x [r*sy, r*sy + h).
    Exact: cells covered by ``region`` take ``tissue_occ`` (or 1), cells on its boundary the summed areas of
    ``run box ∩ cell ∩ region`` over the tissue mask's horizontal pixel runs (disjoint, so areas add).
    """
    import shapely

    out = np.zeros((n_rows, n_cols), np.float32)
    if n_rows <= 0 or n_cols <= 0:
        return out
    sel = np.ones((n_rows, n_cols), bool) if candidates is None else candidates
    rows, cols = np.nonzero(sel)
    if not len(rows):
        return out
    sx, sy = side0
    stx, sty = step0 if step0 is not None else side0
    x0, y0 = cols * stx, rows * sty
    boxes = shapely.box(x0, y0, x0 + sx, y0 + sy)
    shapely.prepare(region)
    touch = shapely.intersects(region, boxes)
    inside = touch & shapely.covers(region, boxes)
    edge = touch & ~inside
    full = tissue_occ[rows, cols] if tissue is not None and tissue_occ is not None else 1.0
    out[rows[inside], cols[inside]] = np.broadcast_to(full, rows.shape)[inside]
    area = sx * sy
    if tissue is None:
        inter = shapely.area(shapely.intersection(boxes[edge], region))
        out[rows[edge], cols[edge]] = np.clip(inter / area, 0, 1)
        return out
    dsx, dsy = mask_ds
    rr, rs, re_ = _mask_runs(tissue)
    for k in np.flatnonzero(edge):
        bx0, by0 = float(x0[k]), float(y0[k])
        bx1, by1 = bx0 + sx, by0 + sy
        i0, i1 = int(math.floor(by0 / dsy)), int(math.ceil(by1 / dsy))
        lo, hi = np.searchsorted(rr, i0), np.searchsorted(rr, i1)
        r_, s_, e_ = rr[lo:hi], rs[lo:hi], re_[lo:hi]
        ax0, ax1 = np.maximum(s_ * dsx, bx0), np.minimum(e_ * dsx, bx1)
        ay0, ay1 = np.maximum(r_ * dsy, by0), np.minimum((r_ + 1) * dsy, by1)
        ok = (ax1 > ax0) & (ay1 > ay0)
        if not ok.any():
            continue
        pieces = shapely.box(ax0[ok], ay0[ok], ax1[ok], ay1[ok])
        inter = float(shapely.area(shapely.intersection(pieces, region)).sum())
        out[rows[k], cols[k]] = min(1.0, inter / area)
    return out


def geometry_rings(geom) -> list[np.ndarray]:
    """Every ring (exteriors and holes) of a (Multi)Polygon as (M, 2) float arrays, for drawing."""
    import shapely

    rings = []
    for poly in shapely.get_parts(geom):
        if poly.geom_type != "Polygon" or poly.is_empty:
            continue
        rings.append(np.asarray(poly.exterior.coords))
        rings += [np.asarray(r.coords) for r in poly.interiors]
    return rings
