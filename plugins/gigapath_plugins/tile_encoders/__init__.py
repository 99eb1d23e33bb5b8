"""Tile encoders (tile_encoder hook)."""
