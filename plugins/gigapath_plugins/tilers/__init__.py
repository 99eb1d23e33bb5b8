"""Tilers (tiler hook)."""
