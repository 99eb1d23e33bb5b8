"""Look at what a model sees: per-tile attention and class scores, heatmaps over the slide, top/bottom-k tile
montages, QuPath measurement maps and the raw per-tile scores (issue #13).

Modules: :mod:`.slide_data` (one embed-run slide folder), :mod:`.scores` (a trained head or the zero-shot CLIP
model -> per-tile scores), :mod:`.render` (heatmap picture), :mod:`.montage` (top/bottom-k tiles),
:mod:`.qupath` (GeoJSON detections), :mod:`.export` (h5/CSV), :mod:`.job` (``gigapath heatmap``).
"""

from .scores import TileScores

__all__ = ["TileScores"]
