"""Interoperability: the coordinate contract we write (v2) and one reader for every tool's tile features.

Public API (other modules code against exactly this)::

    from gigapath_core.interop import read_tile_features, TileFeatures
    tf = read_tile_features(path, level0_mpp=None, coords_unit=None, tile_size=None, target_mpp=0.5, fmt="auto")

See ``docs/formats.md`` for the contract table and how each tool's files are read.
"""

from .contract import COORDS_UNITS, FORMAT_VERSION, coords_attrs, grid_coords_attrs
from .features import TileFeatures, read_tile_features
from .formats import FORMATS
from .locate import FeatureLocator, FeatureSource, read_feature_table

__all__ = ["read_tile_features", "TileFeatures", "FORMAT_VERSION", "COORDS_UNITS", "FORMATS", "coords_attrs",
           "grid_coords_attrs", "FeatureLocator", "FeatureSource", "read_feature_table"]
